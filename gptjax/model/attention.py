"""Causal multi-head self-attention, with an optional key/value cache for generation.

The projections keep the head axis separate (c_attn kernel [embd, 3, heads, head_dim], c_proj
kernel [heads, head_dim, embd]) so that tensor parallelism can split heads; that is a reshape of
GPT-2's [embd, 3 * embd] and [embd, embd] matrices. Attention itself is one
`jax.nn.dot_product_attention` call, which can use cuDNN's fused kernel on GPUs.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model.layers import axes, compute_dtype

# One layer's cache: keys and values [B, S, heads, head_dim] for S = block_size positions.
KV = tuple[jax.Array, jax.Array]


class CausalSelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    head_dim = cfg.n_embd // cfg.n_head
    dtype = compute_dtype(cfg)
    self.c_attn = nnx.LinearGeneral(
        cfg.n_embd, (3, cfg.n_head, head_dim), use_bias=cfg.bias, dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02), kernel_metadata=axes("embed", None, "heads", "kv"),
        bias_metadata=axes(None, "heads", "kv"), rngs=rngs)
    self.c_proj = nnx.LinearGeneral(
        (cfg.n_head, head_dim), cfg.n_embd, axis=(-2, -1), use_bias=cfg.bias, dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer)),
        kernel_metadata=axes("heads", "kv", "embed"), bias_metadata=axes("embed"), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BTD, kv: KV | None, start, dropout_key: jax.Array | None):
    """-> (output [B, T, embd], the cache with this call's keys and values written at
    positions [start, start + T), or None without a cache)."""
    qkv_BT3HK = sharding.constrain(self.c_attn(x_BTD), ("batch", "sequence", None, "heads", "kv"))
    q_BTHK, k_BTHK, v_BTHK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]
    if kv is None:
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
    else:
      # Attend over the whole cache; keys past each query's position (unwritten ones too) are masked.
      cached_k_BSHK = jax.lax.dynamic_update_slice(kv[0], k_BTHK.astype(kv[0].dtype), (0, start, 0, 0))
      cached_v_BSHK = jax.lax.dynamic_update_slice(kv[1], v_BTHK.astype(kv[1].dtype), (0, start, 0, 0))
      query_pos_T = start + jnp.arange(x_BTD.shape[1])
      mask_TS = jnp.arange(cached_k_BSHK.shape[1])[None, :] <= query_pos_T[:, None]
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, cached_k_BSHK, cached_v_BSHK, mask=mask_TS[None, None])
      kv = (cached_k_BSHK, cached_v_BSHK)
    y_BTD = self.c_proj(y_BTHK)
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key), kv
