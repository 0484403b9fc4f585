"""The persistent compilation cache every `gptjax` command turns on (the rest of the suite runs
with it off)."""

import pathlib

from conftest import run_cli
from gptjax import compile_cache


def test_defaults_fill_only_what_is_not_set(tmp_path):
  environ = {"XDG_CACHE_HOME": str(tmp_path)}
  compile_cache.set_defaults(environ)
  assert environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "gptjax" / "jax")
  assert environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(4 * 2**30)
  assert environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"  # the small programs are kept too
  off = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_COMPILATION_CACHE_MAX_SIZE": "-1"}
  compile_cache.set_defaults(off)
  assert off["JAX_COMPILATION_CACHE_DIR"] == "" and off["JAX_COMPILATION_CACHE_MAX_SIZE"] == "-1"


def _entries(cache: pathlib.Path) -> set[str]:
  return {str(p.relative_to(cache)) for p in cache.rglob("*")}


def test_a_second_sample_of_a_checkpoint_compiles_nothing(tmp_path, tiny_run, monkeypatch):
  """The first `gptjax sample` fills an empty cache; the second finds every program there (it
  would write an entry for any program it compiled, as every compilation is kept)."""
  out, _ = tiny_run
  cache = tmp_path / "cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
  args = ["sample", "--checkpoint", out, "--max-new-tokens", "40", "--num-samples", "2"]
  first = run_cli(*args)
  assert first.returncode == 0, first.stderr
  filled = _entries(cache)
  programs = [e for e in filled if e.endswith("-cache")]
  assert len(programs) >= 3, filled  # the parameters' checksums; generation from the prompt, and past block_size
  second = run_cli(*args)
  assert second.returncode == 0, second.stderr
  assert _entries(cache) == filled and second.stdout == first.stdout
