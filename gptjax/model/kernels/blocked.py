"""Causal attention in blocks of queries, each over the keys up to its last position, with
FlashAttention's gradient: the CPU's kernel (`model.attention=blocked`, what `auto` runs on a CPU).
`attend` and `attention_stages` also serve decoding over the cache and the captured forward pass
of `gptjax explain` / `gptjax attention`, which need the weights themselves."""

import math

import jax
import jax.numpy as jnp

from gptjax.model import documents


def causal_attend(q_BTHK, k_BTGK, v_BTGK, segments_BT=None):
  """Queries [B, T, heads, head_dim] over keys and values [B, T, kv_heads, head_dim], causally
  (and within each position's segment, given segment ids [B, T]: in each block's mask).
  The blocks above the diagonal, half the scores, are never computed. Four to eight blocks; on CPU
  this is twice as fast as attending with the full [T, T] mask (benchmarks/RESULTS.md)."""
  T = q_BTHK.shape[1]
  k_BGTK, v_BGTK = k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3)
  block = max(16, min(128, T // 4))
  outputs = []
  for start in range(0, T, block):
    end = min(start + block, T)
    mask_QS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    if segments_BT is not None:  # [B, 1, 1, Q, S]: broadcast over the [G, R] heads of the scores
      mask_QS = (mask_QS & documents.same_document(segments_BT[:, start:end], segments_BT[:, :end]))[:, None, None]
    outputs.append(attend(q_BTHK[:, start:end], k_BGTK[:, :, :end], v_BGTK[:, :, :end], mask_QS))
  return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


@jax.custom_vjp
def attend(q_BTHK, k_BGSK, v_BGSK, mask_TS):
  """Softmax attention as two einsums: queries [B, T, heads, head_dim] over keys and values
  [B, kv_heads, S, head_dim] where mask [T, S] (or [B, 1, 1, T, S]) allows -> [B, T, heads, head_dim]. Scores and
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
