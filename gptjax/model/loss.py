"""The LM head and the next-token cross-entropy together, a chunk of positions at a time.

Training, evaluation and perplexity need each position's loss, not its logits: computed whole,
the float32 logits [B, T, vocab] are the largest arrays of a step (16 x 2048 x 151,680 x 4 bytes,
20 GB, for Qwen3), with their gradient as large again. Here the positions are cut into chunks of
at most `model.loss_chunk`; each chunk's logits are made, reduced to a loss and dropped, and
made again in the backward pass (`jax.checkpoint`), so only one chunk's [B, chunk, vocab] exists
at a time. The head's matmul takes the compute dtype and accumulates in float32
(`layers.float32_logits`); the log-sum-exp is float32. Vocabulary rows padded past `vocab_size`
(`model.vocab_multiple`) are masked inside each chunk, never in a copy of the whole. The loss
comes with each position's log-partition (the logits' log-sum-exp), for PaLM's z-loss.
"""

import jax
import jax.numpy as jnp

from gptjax import sharding
from gptjax.model.layers import float32_logits, soft_cap

LOGITS_AXES = ("batch", "sequence", "vocab")


def chunking(T: int, chunk: int) -> tuple[int, int]:
  """(chunks, positions per chunk) for T positions in chunks of at most `chunk` (0: one chunk), as
  even as they come: the last chunk is padded by fewer than `chunks` positions."""
  if chunk <= 0 or chunk >= T:
    return 1, T
  n = -(-T // chunk)
  return n, -(-T // n)


def next_token_nll(x_BTD, table_VD, targets_BT, *, vocab_size: int, chunk: int,
                   softcap: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(the cross-entropy [B, T], the log-partition [B, T]; float32) of the logits x @ table.T
  (soft-capped at `softcap`, 0: not) against `targets`, over the first `vocab_size` rows of
  `table` [padded vocab, embd], `chunk` positions at a time."""
  B, T, D = x_BTD.shape
  n, c = chunking(T, chunk)
  padded = table_VD.shape[0] > vocab_size

  def chunk_nll(x_BcD, targets_Bc):
    logits_BcV = sharding.constrain(soft_cap(float32_logits(x_BcD, table_VD), softcap), LOGITS_AXES)
    if padded:  # fused into the reductions below: no masked copy
      logits_BcV = jnp.where(jnp.arange(table_VD.shape[0]) < vocab_size, logits_BcV, jnp.finfo(jnp.float32).min)
    target_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
    log_partition_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    return log_partition_Bc - target_Bc, log_partition_Bc

  if n == 1:
    return chunk_nll(x_BTD, targets_BT)
  pad = n * c - T  # positions past T: zeros, scored and dropped
  x_nBcD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
  targets_nBc = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
  per_chunk = jax.lax.map(jax.checkpoint(lambda chunk_args: chunk_nll(*chunk_args)), (x_nBcD, targets_nBc))
  return tuple(a_nBc.swapaxes(0, 1).reshape(B, n * c)[:, :T] for a_nBc in per_chunk)
