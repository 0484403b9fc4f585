"""The original Transformer's fixed positions ("Attention Is All You Need", section 3.5), added to
the token embeddings (`model.positions=sinusoidal`): for position pos and i < D / 2,

    PE[pos, 2i] = sin(pos / 10000^(2i / D)),  PE[pos, 2i + 1] = cos(pos / 10000^(2i / D)).

Each pair of dimensions turns at its own frequency, from one turn per 2 pi positions down to one per
10000 x 2 pi, so PE[pos + k] is a fixed rotation of PE[pos] for every k. Nothing is learned. The
paper also multiplied the token embeddings by sqrt(D); gptjax does not (its embeddings keep GPT-2's
initialisation), so the table's values, of size 1, start far larger than the embeddings' (0.02).
"""

import jax
import jax.numpy as jnp


def table(positions: jax.Array, width: int) -> jax.Array:
  """[..., width] float32: the sinusoidal embedding of each position (of any shape; width even)."""
  inverse_frequencies = 1.0 / 10000.0 ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width)  # [width / 2]
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, width)
