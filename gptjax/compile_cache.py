"""JAX's persistent compilation cache, on for every `gptjax` command: a resumed, repeated or
sampled run loads its compiled steps from disk instead of compiling them again.

The cache lives in `$XDG_CACHE_HOME/gptjax/jax` (`~/.cache/gptjax/jax`), bounded at 4 GiB (least
recently used entries go first). JAX's own variables move or bound it: `JAX_COMPILATION_CACHE_DIR`
(empty turns it off) and `JAX_COMPILATION_CACHE_MAX_SIZE` (bytes; -1: no bound). Every compilation
is kept, the small ones too (JAX keeps only those over a second unless told otherwise).

Set as environment defaults before JAX is imported, so that nothing here imports JAX.
"""

import os
import pathlib

DIR_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
MAX_BYTES = 4 * 2**30


def default_dir(environ=os.environ) -> pathlib.Path:
  return pathlib.Path(environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "gptjax" / "jax"


def set_defaults(environ=os.environ) -> None:
  """The cache's settings in `environ`, where they are not set already (JAX reads them at import)."""
  environ.setdefault(DIR_VARIABLE, str(default_dir(environ)))
  environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES))
  environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def report() -> str:
  """A start-up line: where compiled steps are kept (or that they are not)."""
  import jax  # noqa: PLC0415 (the caller has imported it)
  directory = jax.config.jax_compilation_cache_dir
  if not directory:
    return f"compilation cache: off (set {DIR_VARIABLE} to a directory to keep compiled steps)"
  return f"compilation cache: {directory} (set {DIR_VARIABLE} to move it, empty to turn it off)"
