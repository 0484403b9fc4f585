"""Checksums of array trees, computed where the arrays live: what a checkpoint records at save and
checks at load, so that a damaged file is never read as weights.

Each array's checksum is the sum of its values' bit patterns (as unsigned integers), each weighted
by an odd number that depends on its position, modulo 2**32: any one changed value changes it, and
so does moving values around. It is computed on device (sharded arrays stay where they are), one
fused pass per array.
"""

import jax
import jax.numpy as jnp

_ODD = 2654435761  # Knuth's multiplicative hash constant; any odd number works
ALGORITHM = "odd-weighted-word-sum-32"  # saved with the checksums: another algorithm's are not compared


def _checksum(x: jax.Array) -> jax.Array:
  """A uint32 scalar: sum over words w_i of (2i + 1) * K * w_i, modulo 2**32, where the words are the
  array's bits in units of its own width (up to 32 bits: 64-bit values are two words)."""
  x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
  unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
  words = jax.lax.bitcast_convert_type(x.reshape(x.shape or (1,)), unsigned).astype(jnp.uint32)
  position = jax.lax.broadcasted_iota(jnp.uint32, words.shape, 0)
  for axis in range(1, words.ndim):  # the flat index, built per axis so no sharded axis moves
    position = position * jnp.uint32(words.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  weights = (position * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(_ODD)
  return jnp.sum(weights * words, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> list:
  return [_checksum(x) for x in leaves]


def checksums(tree) -> dict[str, int]:
  """{path of each array in `tree`: its checksum}. Every process of a multi-host run calls this."""
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  values = jax.device_get(_checksums([x for _, x in with_paths]))
  return {jax.tree_util.keystr(path): int(value) for (path, _), value in zip(with_paths, values)}


def first_mismatch(tree, expected: dict[str, int]) -> str | None:
  """The path of the first array of `tree` whose checksum is not `expected`'s, or None."""
  actual = checksums(tree)
  for path in sorted(set(actual) | set(expected)):
    if actual.get(path) != expected.get(path):
      return path
  return None
