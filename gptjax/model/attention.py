"""Causal multi-head self-attention, with an optional key/value cache for generation.

The projections keep the head axis separate (c_attn kernel [embd, 3, heads, head_dim], c_proj
kernel [heads, head_dim, embd]) so that tensor parallelism can split heads; that is a reshape of
GPT-2's [embd, 3 * embd] and [embd, embd] matrices. With fewer key/value heads than query heads
(grouped-query attention, `model.n_kv_head`) the queries and the keys/values have projections of
their own (q_attn [embd, heads, head_dim], kv_attn [embd, 2, kv_heads, head_dim]), and the cache
holds only the key/value heads. Queries and keys are RMS-normalised per head (Qwen3) and rotated
(rotary positions) where configured; with `model.attention_scale=none` the scores are left unscaled
(q.k, not q.k / sqrt(head_dim)): the queries are multiplied by sqrt(head_dim) before any kernel,
which all divide by it. Training, evaluation and the prompt pass of sampling attend
with the kernel `model.attention` chooses (`gptjax.model.kernels`: cuDNN's fused kernel on GPUs,
splash attention on TPUs, query blocks on CPUs). Generation attends over the cache, which keeps
each head's positions contiguous ([.., kv_heads, S, head_dim]) so that the two matmuls read it as
it lies: in the layout of training's attention, XLA copied the whole cache of every layer into
that layout for each new token (a third of the time per token on CPU).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model import kernels
from gptjax.model import rotary
from gptjax.model.documents import Documents
from gptjax.model.kernels.blocked import attend, attention_stages
from gptjax.model.layers import axes, capturing, compute_dtype, norm, sow


@struct.dataclass
class KVCache:
  """Keys and values, an array [B, kv_heads, S, head_dim] per layer, of which the first `length`
  positions are filled: one length for every row (int32 []), or each row's own (int32 [B]: a server's
  slots, each holding a different request). Each layer updates its own arrays in place."""
  key: tuple[jax.Array, ...]
  value: tuple[jax.Array, ...]
  length: jax.Array  # int32 [] or [B]


def positions(start: jax.Array, length: int) -> jax.Array:
  """The positions of `length` tokens after `start` ([] or per row [B]) -> [T] or [B, T]."""
  return jnp.expand_dims(start, -1) + jnp.arange(length)


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

  def _project(self, x_BTD, start, positions_BT=None):
    """-> queries [B, T, heads, head_dim], keys and values [B, T, kv_heads, head_dim] at positions
    start, start + 1, ... or `positions_BT` (normalised and rotated as configured)."""
    if hasattr(self, "c_attn"):
      qkv_BT3HK = sharding.constrain(self.c_attn(x_BTD), ("batch", "sequence", None, "heads", "kv"))
      # One split, not three slices: the gradient is one concatenation instead of three padded sums.
      q_BTHK, k_BTGK, v_BTGK = (x[:, :, 0] for x in jnp.split(qkv_BT3HK, 3, axis=2))
    else:
      q_BTHK = sharding.constrain(self.q_attn(x_BTD), ("batch", "sequence", "heads", "kv"))
      kv_BT2GK = sharding.constrain(self.kv_attn(x_BTD), ("batch", "sequence", None, "kv_heads", "kv"))
      k_BTGK, v_BTGK = (x[:, :, 0] for x in jnp.split(kv_BT2GK, 2, axis=2))
    sow(self, "queries", q_BTHK), sow(self, "keys", k_BTGK), sow(self, "values", v_BTGK)
    if self.cfg.qk_norm:
      q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
      sow(self, "queries_normed", q_BTHK), sow(self, "keys_normed", k_BTGK)
    if self.cfg.positions == "rope":
      at = positions(start, x_BTD.shape[1]) if positions_BT is None else positions_BT
      q_BTHK, k_BTGK = rotary.rotate(q_BTHK, at, self.cfg), rotary.rotate(k_BTGK, at, self.cfg)
      sow(self, "queries_rotated", q_BTHK), sow(self, "keys_rotated", k_BTGK)
    if self.cfg.attention_scale == "none":  # every kernel divides the scores by sqrt(head_dim): undone here
      q_BTHK = q_BTHK * jnp.asarray(math.sqrt(self.cfg.head_size), q_BTHK.dtype)
    return q_BTHK, k_BTGK, v_BTGK

  def __call__(self, x_BTD, cache: KVCache | None, layer, dropout_key: jax.Array | None, prefill: bool = False,
               documents: Documents | None = None):
    """-> (output [B, T, embd], the cache with this call's keys and values written into layer
    `layer`'s arrays at positions [length, length + T); None without a cache). `prefill`: the
    cache is empty, so the tokens attend among themselves with the training kernel. `documents`
    (training and evaluation): each position attends within its own document."""
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD, 0 if cache is None else cache.length,
                                           None if documents is None else documents.positions_BT)
    if cache is not None:
      cache = self._write(k_BTGK, v_BTGK, cache, layer)
    if cache is not None and not prefill:
      y_BTHK = self._attend_cached(q_BTHK, cache, layer)
    elif capturing(self):
      y_BTHK = self._attend_captured(q_BTHK, k_BTGK, v_BTGK)
    else:
      y_BTHK = kernels.causal_attention(q_BTHK, k_BTGK, v_BTGK, self.cfg,
                                        None if documents is None else documents.segments_BT)
    y_BTD = self.c_proj(y_BTHK)
    sow(self, "output", y_BTD)
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key), cache

  def _write(self, k_BTGK, v_BTGK, cache: KVCache, layer) -> KVCache:
    """The cache with the new keys and values written into layer `layer`'s arrays at cache.length
    (each row at its own, where the rows have their own lengths)."""

    def write(stored_BGSK, new_BTGK):
      new_BGTK = new_BTGK.transpose(0, 2, 1, 3).astype(stored_BGSK.dtype)
      if cache.length.ndim == 0:
        return jax.lax.dynamic_update_slice(stored_BGSK, new_BGTK, (0, 0, cache.length, 0))
      return jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (0, at, 0)))(
          stored_BGSK, new_BGTK, cache.length)

    k_BGSK, v_BGSK = write(cache.key[layer], k_BTGK), write(cache.value[layer], v_BTGK)
    return cache.replace(key=(*cache.key[:layer], k_BGSK, *cache.key[layer + 1:]),
                         value=(*cache.value[:layer], v_BGSK, *cache.value[layer + 1:]))

  def _attend_cached(self, q_BTHK, cache: KVCache, layer):
    """The queries over layer `layer`'s whole cache (already holding their own keys); keys past
    each query's position (unwritten ones too) are masked."""
    k_BGSK, v_BGSK = cache.key[layer], cache.value[layer]
    query_pos = positions(cache.length, q_BTHK.shape[1])  # [T] or [B, T]
    mask = jnp.arange(k_BGSK.shape[2]) <= query_pos[..., None]  # [T, S] or [B, T, S]
    return attend(q_BTHK, k_BGSK, v_BGSK, mask if mask.ndim == 2 else mask[:, None, None])

  def _attend_captured(self, q_BTHK, k_BTGK, v_BTGK):
    """`attend`'s computation over the whole causal mask, keeping its stages (per query head,
    [B, heads, T, T]) and the heads concatenated [B, T, heads * head_dim]; for `nnx.capture`."""
    B, T, H, K = q_BTHK.shape
    mask_TT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    stages = attention_stages(q_BTHK, k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3), mask_TT)
    for name, stage in (("scores", "scores"), ("masked", "masked"), ("weights", "probs")):
      sow(self, name, stages[f"{stage}_BGRTS"].reshape(B, H, T, T))
    y_BTHK = stages["y_BTGRK"].reshape(B, T, H, K)
    sow(self, "weighted_values", y_BTHK)
    sow(self, "heads_concatenated", y_BTHK.reshape(B, T, H * K))  # what c_proj contracts: (heads, head_dim) as one axis
    return y_BTHK
