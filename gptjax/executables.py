"""Compiled programs kept across starts: a command's second start loads the executables the first
compiled, without tracing or lowering them again.

JAX's persistent compilation cache (`gptjax.compile_cache`) keys on the lowered program, so a hit
still traces and lowers it: for `gptjax sample` that is most of a warm start. Here a program is
keyed instead by what it is traced from (the function, its static arguments, the shapes, dtypes and
shardings of its arguments, gptjax's source and the versions of JAX and Flax, the devices), and its
executable (`jax.experimental.serialize_executable`, as MaxText keeps an AOT-compiled step) is
kept in a folder beside JAX's cache, `gptjax-executables/`, the newest `KEEP` of them. With the
cache off (an empty `JAX_COMPILATION_CACHE_DIR`), or in a multi-process run, programs are compiled
as usual. An entry that does not load is compiled again and replaced.
"""

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import pickle
import tempfile

import jax
from jax.experimental import serialize_executable

KEEP = 64  # executables kept; the least recently used go first
_loaded: dict[str, jax.stages.Compiled] = {}  # this process's, by key


def store_dir() -> pathlib.Path | None:
  """Where executables are kept: beside JAX's compilation cache, or None when that is off."""
  directory = jax.config.jax_compilation_cache_dir
  return pathlib.Path(directory) / "gptjax-executables" if directory else None


@functools.cache
def _environment() -> str:
  """What every program depends on besides its arguments: gptjax's source, the libraries that trace
  and compile it, the devices and the settings that change a traced program."""
  source = hashlib.sha256()
  for path in sorted(pathlib.Path(__file__).parent.rglob("*.py")):
    source.update(path.name.encode() + path.read_bytes())
  versions = [importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax")]
  devices = [(d.platform, d.device_kind) for d in jax.devices()]
  settings = [jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision, os.environ.get("XLA_FLAGS", "")]
  return repr((source.hexdigest(), versions, devices, settings))


def _key(jitted, args, static: dict) -> str:
  def describe(x):  # the executable holds its devices: their ids in the mesh's order are part of it
    if not isinstance(x, jax.Array):
      return str(jax.typeof(x))  # a NumPy array or a Python number (weakly typed)
    s = x.sharding
    devices = s.mesh.devices.ravel() if isinstance(s, jax.sharding.NamedSharding) else sorted(s.device_set, key=lambda d: d.id)
    return str(jax.typeof(x)), str(getattr(s, "spec", None)), getattr(getattr(s, "mesh", None), "shape_tuple", None), \
        [d.id for d in devices]
  leaves, tree = jax.tree.flatten(args)
  what = (_environment(), jitted.__module__, jitted.__qualname__, sorted(static.items()), str(tree),
          [describe(x) for x in leaves])
  return hashlib.sha256(repr(what).encode()).hexdigest()[:32]


def compiled(jitted, *args, **static):
  """`jitted` (a `jax.jit` function) compiled for `args` and its static keyword arguments: loaded
  from the store if an earlier start kept it, else compiled and kept. Call it with `args`."""
  directory = store_dir()
  if directory is None or jax.process_count() > 1:
    return functools.partial(jitted, **static)
  key = _key(jitted, args, static)
  if key not in _loaded:
    path = directory / f"{key}.bin"
    _loaded[key] = _load(path) or _compile_and_keep(jitted, args, static, path)
  return _loaded[key]


def _load(path: pathlib.Path) -> jax.stages.Compiled | None:
  try:
    entry = path.read_bytes()
  except OSError:  # not kept (or not readable)
    return None
  try:
    blob, in_tree, out_tree, device_ids = pickle.loads(entry)
    devices = {d.id: d for d in jax.devices()}
    executable = serialize_executable.deserialize_and_load(
        blob, in_tree, out_tree, execution_devices=[devices[i] for i in device_ids])
  except Exception:  # noqa: BLE001 (a damaged or foreign entry, in whatever way: compile it again)
    path.unlink(missing_ok=True)
    return None
  try:
    os.utime(path)  # recently used
  except OSError:
    pass
  return executable


def _compile_and_keep(jitted, args, static: dict, path: pathlib.Path) -> jax.stages.Compiled:
  executable = jitted.trace(*args, **static).lower().compile()
  try:
    device_ids = [d.id for d in executable.runtime_executable().local_devices()]  # the devices it runs on
    entry = pickle.dumps((*serialize_executable.serialize(executable), device_ids))
  except Exception:  # noqa: BLE001 (a program XLA or pickle cannot serialize is not kept; it still runs)
    return executable
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
      with os.fdopen(handle, "wb") as f:
        f.write(entry)
      os.replace(partial, path)  # whole or absent, also with two commands writing it at once
    finally:
      pathlib.Path(partial).unlink(missing_ok=True)  # a write that failed leaves nothing behind
    kept = sorted(path.parent.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEEP:]:
      old.unlink(missing_ok=True)
  except OSError:  # a full or read-only disk: not kept, and nothing else lost
    pass
  return executable
