"""XLA's attention (`model.attention=xla`): `jax.nn.dot_product_attention`'s XLA path, one masked
softmax over the whole [T, T] scores (float32), which XLA fuses as it can. Runs anywhere; what
`auto` falls back to on a GPU or TPU where the fused kernel does not apply."""

import jax


def causal_attend(q_BTHK, k_BTGK, v_BTGK):
  """Queries [B, T, heads, head_dim] over keys and values [B, T, kv_heads, head_dim], causally."""
  return jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, is_causal=True, implementation="xla")
