"""Documents in a packed window: which document each position belongs to, and its place in it.

A window drawn from a corpus runs across document boundaries, which `gptjax prepare` marks with
the tokenizer's document-start token (its beginning-of-sequence token where it has one, else its
end-of-text, which GPT-2 writes between documents). With document masking (`data.document_mask`)
a position attends only to the earlier positions of its own document, and with
`data.document_positions` its position (learned or rotary) counts from its document's start, so
that a packed window computes what each of its documents would alone. The start token opens its
document: the end-of-text of GPT-2's data is the first token of the document after it.
"""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Documents:
  segments_BT: jax.Array  # int32 [B, T]: the document of each position, counted within the window
  positions_BT: jax.Array | None  # int32 [B, T]: the position within its document; None: the window's


def split(tokens_BT: jax.Array, start_id: int, restart_positions: bool) -> Documents:
  """The documents of `tokens_BT` [B, T], each opened by `start_id` (the window's first positions
  are the end of a document that began before it)."""
  starts_BT = tokens_BT == start_id
  segments_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32)
  if not restart_positions:
    return Documents(segments_BT, None)
  t_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
  opened_at_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)
  return Documents(segments_BT, t_BT - opened_at_BT)


def same_document(q_segments_BT: jax.Array, k_segments_BS: jax.Array) -> jax.Array:
  """bool [B, T, S]: whether query t and key s are of one document."""
  return q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
