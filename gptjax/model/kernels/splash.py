"""Pallas splash attention on TPUs (`model.attention=splash`, what `auto` runs on a TPU where it
applies): the block-sparse flash attention kernel that ships inside JAX
(`jax.experimental.pallas.ops.tpu.splash_attention`), over a causal mask, so that the blocks
above the diagonal are skipped and the [T, T] scores never reach memory. It lowers to Mosaic
`tpu_custom_call`s (one forward, two for the gradient: dq and dk/dv). Its blocks are multiples of
128 positions, so the sequence must be. Grouped-query heads are taken as they are. It runs per
shard (`kernels.per_shard`), vmapped over each device's rows; on a CPU it runs in Pallas'
interpret mode (slow: for tests)."""

import functools
import math

import jax
import numpy as np

BLOCK_MULTIPLE = 128  # the TPU's lane width: splash's key blocks must be multiples of it


def _block(T: int) -> int:
  """The largest of 512, 256 and 128 positions that divides T."""
  return next(b for b in (512, 256, 128) if T % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, T: int, interpret: bool, mesh: jax.sharding.AbstractMesh):
  """The splash kernel for `heads` query heads over a causal mask of T positions; its block masks
  are made as constants (typed by the `mesh` traced under), so that one kernel serves every trace."""
  from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: PLC0415 (Pallas' TPU package: 0.25 s)
  b = _block(T)
  blocks = splash_attention.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                       block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = splash_attention.MultiHeadMask([splash_attention.CausalMask((T, T))] * heads)
  with jax.ensure_compile_time_eval():
    return splash_attention.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                            interpret=interpret)


def causal_attend(q_BTHK, k_BTGK, v_BTGK, segments_BT=None, *, interpret: bool):
  """Queries [B, T, heads, head_dim] over keys and values [B, T, kv_heads, head_dim], causally
  (and within each position's segment, given segment ids [B, T]: splash's own `SegmentIds`).
  Splash does not scale the scores: the queries are scaled by 1/sqrt(head_dim) first."""
  from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: PLC0415 (see _kernel)
  B, T, H, K = q_BTHK.shape
  kernel = _kernel(H, T, interpret, jax.sharding.get_abstract_mesh())
  q_BHTK = (q_BTHK * np.asarray(1 / math.sqrt(K), q_BTHK.dtype)).transpose(0, 2, 1, 3)
  k_BGTK, v_BGTK = k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3)
  if segments_BT is None:
    return jax.vmap(kernel)(q_BHTK, k_BGTK, v_BGTK).transpose(0, 2, 1, 3)
  in_row = lambda q, k, v, segments_T: kernel(q, k, v, segment_ids=splash_attention.SegmentIds(segments_T, segments_T))  # noqa: E731
  return jax.vmap(in_row)(q_BHTK, k_BGTK, v_BGTK, segments_BT).transpose(0, 2, 1, 3)
