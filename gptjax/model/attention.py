"""Causal multi-head self-attention, with an optional key/value cache for generation.

The projections keep the head axis separate (c_attn kernel [embd, 3, heads, head_dim], c_proj
kernel [heads, head_dim, embd]) so that tensor parallelism can split heads; that is a reshape of
GPT-2's [embd, 3 * embd] and [embd, embd] matrices. With fewer key/value heads than query heads
(grouped-query attention, `model.n_kv_head`) the queries and the keys/values have projections of
their own (q_attn [embd, heads, head_dim], kv_attn [embd, 2, kv_heads, head_dim]), and the cache
holds only the key/value heads. Queries and keys are RMS-normalised per head (Qwen3) and rotated
(rotary positions) where configured. Attention itself is one
`jax.nn.dot_product_attention` call, which can use cuDNN's fused kernel on GPUs.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model import rotary
from gptjax.model.layers import axes, compute_dtype, norm


@struct.dataclass
class KVCache:
  """Keys and values of every layer [n_layer, B, block_size, kv_heads, head_dim], of which the first
  `length` positions are filled. Each layer writes its own slice in place."""
  key: jax.Array
  value: jax.Array
  length: jax.Array  # int32 []


class CausalSelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    heads, kv_heads, head_dim, dtype = cfg.n_head, cfg.kv_heads, cfg.head_size, compute_dtype(cfg)
    linear = dict(use_bias=cfg.bias or cfg.qkv_bias, dtype=dtype, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    if kv_heads == heads:  # GPT-2's fused projection
      self.c_attn = nnx.LinearGeneral(cfg.n_embd, (3, heads, head_dim), kernel_metadata=axes("embed", None, "heads", "kv"),
                                      bias_metadata=axes(None, "heads", "kv"), **linear)
    else:  # grouped-query attention: fewer key/value heads, each shared by n_head / n_kv_head queries
      self.q_attn = nnx.LinearGeneral(cfg.n_embd, (heads, head_dim), kernel_metadata=axes("embed", "heads", "kv"),
                                      bias_metadata=axes("heads", "kv"), **linear)
      self.kv_attn = nnx.LinearGeneral(cfg.n_embd, (2, kv_heads, head_dim), bias_metadata=axes(None, "kv_heads", "kv"),
                                       kernel_metadata=axes("embed", None, "kv_heads", "kv"), **linear)
    if cfg.qk_norm:
      self.q_norm = norm(cfg, head_dim, "kv", rngs=rngs)
      self.k_norm = norm(cfg, head_dim, "kv", rngs=rngs)
    self.c_proj = nnx.LinearGeneral(
        (heads, head_dim), cfg.n_embd, axis=(-2, -1), use_bias=cfg.bias, dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer)),
        kernel_metadata=axes("heads", "kv", "embed"), bias_metadata=axes("embed"), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def _project(self, x_BTD, start):
    """-> queries [B, T, heads, head_dim], keys and values [B, T, kv_heads, head_dim] at positions
    start, start + 1, ... (normalised and rotated as configured)."""
    if hasattr(self, "c_attn"):
      qkv_BT3HK = sharding.constrain(self.c_attn(x_BTD), ("batch", "sequence", None, "heads", "kv"))
      q_BTHK, k_BTGK, v_BTGK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]
    else:
      q_BTHK = sharding.constrain(self.q_attn(x_BTD), ("batch", "sequence", "heads", "kv"))
      kv_BT2GK = sharding.constrain(self.kv_attn(x_BTD), ("batch", "sequence", None, "kv_heads", "kv"))
      k_BTGK, v_BTGK = kv_BT2GK[:, :, 0], kv_BT2GK[:, :, 1]
    if self.cfg.qk_norm:
      q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
    if self.cfg.positions == "rope":
      positions_T = start + jnp.arange(x_BTD.shape[1])
      q_BTHK, k_BTGK = rotary.rotate(q_BTHK, positions_T, self.cfg), rotary.rotate(k_BTGK, positions_T, self.cfg)
    return q_BTHK, k_BTGK, v_BTGK

  def __call__(self, x_BTD, cache: KVCache | None, layer, dropout_key: jax.Array | None):
    """-> (output [B, T, embd], the cache with this call's keys and values written into layer
    `layer` at positions [length, length + T); None without a cache)."""
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD, 0 if cache is None else cache.length)
    if cache is None:
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, is_causal=True)
    else:
      at = (layer, 0, cache.length, 0, 0)
      cache = cache.replace(key=jax.lax.dynamic_update_slice(cache.key, k_BTGK[None].astype(cache.key.dtype), at),
                            value=jax.lax.dynamic_update_slice(cache.value, v_BTGK[None].astype(cache.value.dtype), at))
      k_BSGK = jax.lax.dynamic_index_in_dim(cache.key, layer, keepdims=False)
      v_BSGK = jax.lax.dynamic_index_in_dim(cache.value, layer, keepdims=False)
      # Attend over the whole cache; keys past each query's position (unwritten ones too) are masked.
      query_pos_T = cache.length + jnp.arange(x_BTD.shape[1])
      mask_TS = jnp.arange(k_BSGK.shape[1])[None, :] <= query_pos_T[:, None]
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_TS[None, None])
    y_BTD = self.c_proj(y_BTHK)
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key), cache
