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
from flax import struct

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model.layers import axes, compute_dtype


@struct.dataclass
class KVCache:
  """Keys and values of every layer [n_layer, B, block_size, heads, head_dim], of which the first
  `length` positions are filled. Each layer writes its own slice in place."""
  key: jax.Array
  value: jax.Array
  length: jax.Array  # int32 []


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

  def __call__(self, x_BTD, cache: KVCache | None, layer, dropout_key: jax.Array | None):
    """-> (output [B, T, embd], the cache with this call's keys and values written into layer
    `layer` at positions [length, length + T); None without a cache)."""
    qkv_BT3HK = sharding.constrain(self.c_attn(x_BTD), ("batch", "sequence", None, "heads", "kv"))
    q_BTHK, k_BTHK, v_BTHK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]
    if cache is None:
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
    else:
      at = (layer, 0, cache.length, 0, 0)
      cache = cache.replace(key=jax.lax.dynamic_update_slice(cache.key, k_BTHK[None].astype(cache.key.dtype), at),
                            value=jax.lax.dynamic_update_slice(cache.value, v_BTHK[None].astype(cache.value.dtype), at))
      k_BSHK = jax.lax.dynamic_index_in_dim(cache.key, layer, keepdims=False)
      v_BSHK = jax.lax.dynamic_index_in_dim(cache.value, layer, keepdims=False)
      # Attend over the whole cache; keys past each query's position (unwritten ones too) are masked.
      query_pos_T = cache.length + jnp.arange(x_BTD.shape[1])
      mask_TS = jnp.arange(k_BSHK.shape[1])[None, :] <= query_pos_T[:, None]
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask_TS[None, None])
    y_BTD = self.c_proj(y_BTHK)
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key), cache
