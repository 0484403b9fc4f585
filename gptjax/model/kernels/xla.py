"""XLA's attention (`model.attention=xla`): `jax.nn.dot_product_attention`'s XLA path, one masked
softmax over the whole [T, T] scores (float32), which XLA fuses as it can. Runs anywhere; what
`auto` falls back to on a GPU or TPU where the fused kernel does not apply. Documents are part of
its mask."""

import jax

from gptjax.model import documents


def causal_attend(q_BTHK, k_BTGK, v_BTGK, segments_BT=None):
  """Queries [B, T, heads, head_dim] over keys and values [B, T, kv_heads, head_dim], causally
  (and within each position's segment, given segment ids [B, T])."""
  mask_B1TT = None if segments_BT is None else documents.same_document(segments_BT, segments_BT)[:, None]
  return jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, mask=mask_B1TT, is_causal=True, implementation="xla")
