"""Causal multi-head self-attention, with an optional key/value cache for generation.

The projections keep the head axis separate (c_attn kernel [embd, 3, heads, head_dim], c_proj
kernel [heads, head_dim, embd]) so that tensor parallelism can split heads; that is a reshape of
GPT-2's [embd, 3 * embd] and [embd, embd] matrices. With fewer key/value heads than query heads
(grouped-query attention, `model.n_kv_head`) the queries and the keys/values have projections of
their own (q_attn [embd, heads, head_dim], kv_attn [embd, 2, kv_heads, head_dim]), and the cache
holds only the key/value heads. Queries and keys are RMS-normalised per head (Qwen3) and rotated
(rotary positions) where configured. Training attention (`model.attention`) is one
`jax.nn.dot_product_attention` call on accelerators, which can use cuDNN's fused kernel on GPUs,
and on CPU `causal_attend`: blocks of queries that skip the keys above the diagonal, with
FlashAttention's gradient. Generation attends over the cache, which keeps
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
from gptjax.model import rotary
from gptjax.model.layers import axes, capturing, compute_dtype, norm, sow


@struct.dataclass
class KVCache:
  """Keys and values, an array [B, kv_heads, S, head_dim] per layer, of which the first `length`
  positions are filled. Each layer updates its own arrays in place."""
  key: tuple[jax.Array, ...]
  value: tuple[jax.Array, ...]
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
      positions_T = start + jnp.arange(x_BTD.shape[1])
      q_BTHK, k_BTGK = rotary.rotate(q_BTHK, positions_T, self.cfg), rotary.rotate(k_BTGK, positions_T, self.cfg)
      sow(self, "queries_rotated", q_BTHK), sow(self, "keys_rotated", k_BTGK)
    return q_BTHK, k_BTGK, v_BTGK

  def __call__(self, x_BTD, cache: KVCache | None, layer, dropout_key: jax.Array | None):
    """-> (output [B, T, embd], the cache with this call's keys and values written into layer
    `layer`'s arrays at positions [length, length + T); None without a cache)."""
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD, 0 if cache is None else cache.length)
    if cache is not None:
      y_BTHK, cache = self._attend_cached(q_BTHK, k_BTGK, v_BTGK, cache, layer)
    elif capturing(self):
      y_BTHK = self._attend_captured(q_BTHK, k_BTGK, v_BTGK)
    elif self.cfg.attention == "blocked" or (self.cfg.attention == "auto" and jax.default_backend() == "cpu"):
      y_BTHK = causal_attend(q_BTHK, k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3))
    else:  # cuDNN's fused kernel where it applies ("auto" on GPUs), else XLA's
      y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, is_causal=True,
                                            implementation="xla" if self.cfg.attention == "xla" else None)
    y_BTD = self.c_proj(y_BTHK)
    sow(self, "output", y_BTD)
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key), cache

  def _attend_cached(self, q_BTHK, k_BTGK, v_BTGK, cache: KVCache, layer):
    """Writes the new keys and values at cache.length, then attends over the whole cache; keys past
    each query's position (unwritten ones too) are masked."""
    at = (0, 0, cache.length, 0)
    k_BGSK, v_BGSK = (jax.lax.dynamic_update_slice(stored[layer], new.transpose(0, 2, 1, 3).astype(stored[layer].dtype), at)
                      for stored, new in ((cache.key, k_BTGK), (cache.value, v_BTGK)))
    cache = cache.replace(key=(*cache.key[:layer], k_BGSK, *cache.key[layer + 1:]),
                          value=(*cache.value[:layer], v_BGSK, *cache.value[layer + 1:]))
    query_pos_T = cache.length + jnp.arange(q_BTHK.shape[1])
    return attend(q_BTHK, k_BGSK, v_BGSK, jnp.arange(k_BGSK.shape[2])[None, :] <= query_pos_T[:, None]), cache


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


def causal_attend(q_BTHK, k_BGTK, v_BGTK):
  """Causal attention in blocks of queries, each over the keys up to its last position: the
  blocks above the diagonal, half the scores, are never computed. Four to eight blocks; on CPU
  this is twice as fast as attending with the full [T, T] mask (benchmarks/RESULTS.md)."""
  T = q_BTHK.shape[1]
  block = max(16, min(128, T // 4))
  outputs = []
  for start in range(0, T, block):
    end = min(start + block, T)
    mask_QS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    outputs.append(attend(q_BTHK[:, start:end], k_BGTK[:, :, :end], v_BGTK[:, :, :end], mask_QS))
  return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


@jax.custom_vjp
def attend(q_BTHK, k_BGSK, v_BGSK, mask_TS):
  """Softmax attention as two einsums: queries [B, T, heads, head_dim] over keys and values
  [B, kv_heads, S, head_dim] where mask [T, S] allows -> [B, T, heads, head_dim]. Scores and
  softmax in float32. Its gradient is FlashAttention's: the softmax's row sums come from the
  output and its gradient ([T, head_dim]), not from the [T, S] weights."""
  return _attend_forward(q_BTHK, k_BGSK, v_BGSK, mask_TS)[0]


def attention_stages(q_BTHK, k_BGSK, v_BGSK, mask_TS) -> dict:
  """Every stage of `attend`: the queries grouped by the key/value head they share, the scaled
  scores, the scores masked (-inf where the mask forbids), the softmax (float32, and as weights in
  the values' dtype) and the weighted values; heads are [G, R] (query head h = g * R + r)."""
  B, T, H, K = q_BTHK.shape
  G = k_BGSK.shape[1]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)  # R: the query heads that share a key/value head
  scores_BGRTS = jnp.einsum("btgrk,bgsk->bgrts", q_BTGRK, k_BGSK, preferred_element_type=jnp.float32) / math.sqrt(K)
  masked_BGRTS = jnp.where(mask_TS, scores_BGRTS, -jnp.inf)
  probs_BGRTS = jax.nn.softmax(masked_BGRTS, axis=-1)  # float32
  weights_BGRTS = probs_BGRTS.astype(v_BGSK.dtype)
  y_BTGRK = jnp.einsum("bgrts,bgsk->btgrk", weights_BGRTS, v_BGSK)
  return dict(q_BTGRK=q_BTGRK, scores_BGRTS=scores_BGRTS, masked_BGRTS=masked_BGRTS, probs_BGRTS=probs_BGRTS,
              weights_BGRTS=weights_BGRTS, y_BTGRK=y_BTGRK)


def _attend_forward(q_BTHK, k_BGSK, v_BGSK, mask_TS):
  stages = attention_stages(q_BTHK, k_BGSK, v_BGSK, mask_TS)
  q_BTGRK, weights_BGRTS, y_BTGRK = stages["q_BTGRK"], stages["weights_BGRTS"], stages["y_BTGRK"]
  return y_BTGRK.reshape(q_BTHK.shape), (q_BTGRK, k_BGSK, v_BGSK, weights_BGRTS, y_BTGRK)


def _attend_backward(saved, dy_BTHK):
  q_BTGRK, k_BGSK, v_BGSK, weights_BGRTS, y_BTGRK = saved
  dy_BTGRK = dy_BTHK.reshape(y_BTGRK.shape)
  dv_BGSK = jnp.einsum("bgrts,btgrk->bgsk", weights_BGRTS, dy_BTGRK)
  dweights_BGRTS = jnp.einsum("btgrk,bgsk->bgrts", dy_BTGRK, v_BGSK, preferred_element_type=jnp.float32)
  rowsum_BGRT = jnp.einsum("btgrk,btgrk->bgrt", dy_BTGRK, y_BTGRK, preferred_element_type=jnp.float32)
  dscores_BGRTS = (weights_BGRTS * (dweights_BGRTS - rowsum_BGRT[..., None]) / math.sqrt(q_BTGRK.shape[-1]))
  dscores_BGRTS = dscores_BGRTS.astype(q_BTGRK.dtype)
  dq_BTGRK = jnp.einsum("bgrts,bgsk->btgrk", dscores_BGRTS, k_BGSK)
  dk_BGSK = jnp.einsum("bgrts,btgrk->bgsk", dscores_BGRTS, q_BTGRK)
  return dq_BTGRK.reshape(dy_BTHK.shape), dk_BGSK, dv_BGSK, None


attend.defvjp(_attend_forward, _attend_backward)
