"""Executables kept across starts (the store is on here; the rest of the suite runs with it off)."""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import executables


@functools.partial(jax.jit, static_argnames="power")
def _scaled(x, y, *, power: int):
  return jnp.sum(x ** power) * y


@pytest.fixture
def store(tmp_path, monkeypatch):
  monkeypatch.setattr(executables, "store_dir", lambda: tmp_path / "store")
  monkeypatch.setattr(executables, "_loaded", {})  # as in a new process
  return tmp_path / "store"


def _new_process(monkeypatch):
  monkeypatch.setattr(executables, "_loaded", {})


def test_a_second_start_loads_the_executable_without_compiling(store, monkeypatch):
  x, y = np.arange(6, dtype=np.float32).reshape(2, 3), np.float32(2)
  first = executables.compiled(_scaled, x, y, power=2)(x, y)
  assert len(list(store.glob("*.bin"))) == 1
  _new_process(monkeypatch)
  monkeypatch.setattr(executables, "_compile_and_keep", lambda *_: pytest.fail("compiled again"))
  second = executables.compiled(_scaled, x, y, power=2)(x, y)
  assert float(first) == float(second) == float(_scaled(x, y, power=2)) == 110.0


def test_another_shape_dtype_sharding_or_static_argument_is_another_program(store):
  x = np.ones((2, 3), np.float32)
  on_two = jax.device_put(np.ones((4, 3), np.float32), jax.NamedSharding(
      jax.make_mesh((2,), ("data",), devices=jax.devices()[:2]), jax.P("data")))
  for args, power in [((x, 1.0), 2), ((x, 1.0), 3), ((x[:1], 1.0), 2), ((x.astype(np.float16), 1.0), 2),
                      ((on_two, 1.0), 2), ((x, np.float32(1.0)), 2)]:  # a Python float is weakly typed
    assert float(executables.compiled(_scaled, *args, power=power)(*args)) == float(_scaled(*args, power=power))
  assert len(list(store.glob("*.bin"))) == 6


def _for_other_devices(entry: bytes) -> bytes:
  *executable, _ = pickle.loads(entry)
  return pickle.dumps((*executable, [99]))  # a device this machine does not have


@pytest.mark.parametrize("damage", [lambda entry: entry[:1000], _for_other_devices],
                         ids=["cut short", "for other devices"])
def test_a_damaged_entry_is_compiled_again_and_replaced(store, monkeypatch, damage):
  x, y = np.ones(3, np.float32), np.float32(1)
  executables.compiled(_scaled, x, y, power=2)(x, y)
  [entry] = store.glob("*.bin")
  entry.write_bytes(damage(entry.read_bytes()))
  _new_process(monkeypatch)
  assert float(executables.compiled(_scaled, x, y, power=2)(x, y)) == 3.0
  _new_process(monkeypatch)  # the replacement loads
  monkeypatch.setattr(executables, "_compile_and_keep", lambda *_: pytest.fail("compiled again"))
  assert float(executables.compiled(_scaled, x, y, power=2)(x, y)) == 3.0


def test_the_newest_are_kept(store, monkeypatch):
  monkeypatch.setattr(executables, "KEEP", 2)
  for n in (1, 2, 3):
    x = np.ones(n, np.float32)
    executables.compiled(_scaled, x, np.float32(1), power=2)
  assert len(list(store.glob("*.bin"))) == 2


def test_a_store_that_cannot_be_written_or_is_off_still_runs(tmp_path, monkeypatch):
  (tmp_path / "a file").write_text("")
  x, y = np.ones(3, np.float32), np.float32(1)
  for directory in (tmp_path / "a file" / "store", None):  # a folder that cannot be made; the cache off
    monkeypatch.setattr(executables, "store_dir", lambda d=directory: d)
    _new_process(monkeypatch)
    assert float(executables.compiled(_scaled, x, y, power=2)(x, y)) == 3.0
  assert [p.name for p in tmp_path.iterdir()] == ["a file"]
