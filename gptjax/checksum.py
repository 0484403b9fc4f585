"""Checksums of array trees, computed where the arrays live: what a checkpoint records at save and
checks at load, so that a damaged file is never read as weights.

Each array's checksum is the sum of its bytes, each weighted by an odd number that depends on its
position, modulo 2**32: any one changed byte changes it, and so does moving bytes around. It is
computed on device (sharded arrays stay where they are), one small fused pass per array.
"""

import jax
import jax.numpy as jnp

_ODD = 2654435761  # Knuth's multiplicative hash constant; any odd number works


def _checksum(x: jax.Array) -> jax.Array:
  """A uint32 scalar: sum over bytes b_i of (2i + 1) * K * b_i, modulo 2**32."""
  x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
  bytes_ = jax.lax.bitcast_convert_type(x.reshape(x.shape or (1,)), jnp.uint8)  # [*shape, itemsize] or shape
  position = jax.lax.broadcasted_iota(jnp.uint32, bytes_.shape, 0)
  for axis in range(1, bytes_.ndim):  # the flat index, built per axis so no sharded axis moves
    position = position * jnp.uint32(bytes_.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, bytes_.shape, axis)
  weights = (position * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(_ODD)
  return jnp.sum(weights * bytes_.astype(jnp.uint32), dtype=jnp.uint32)


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
