"""Causal attention kernels for training and the prompt pass, interchangeable: each is a function
of queries [B, T, heads, head_dim] and keys, values [B, T, kv_heads, head_dim] -> [B, T, heads,
head_dim], attending causally, and with document segment ids [B, T] (`gptjax.model.documents`)
only within each position's document. `model.attention` chooses one:

| kernel | runs on | what it is | documents |
|---|---|---|---|
| `cudnn` | NVIDIA GPUs, bfloat16 | cuDNN's fused flash attention (`cudnn.py`) | a [B, 1, T, T] mask |
| `splash` | TPUs (a CPU in interpret mode) | Pallas splash attention (`splash.py`) | its segment ids |
| `xla` | anywhere | one masked [T, T] softmax, as XLA fuses it (`xla.py`) | in the mask |
| `blocked` | anywhere | query blocks that skip the keys above the diagonal (`blocked.py`) | in each block's mask |

`auto` (the default) is cudnn on GPUs, splash on TPUs and blocked on CPUs; where the fused kernel
does not apply (float32 on a GPU, a head size cuDNN does not take, a sequence that is not a
multiple of 128 on a TPU) it is xla, and `choose` says why. An explicit choice that cannot run
is a one-line error. The fused kernels run per shard (`per_shard`); XLA partitions the others.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.model.kernels import blocked, cudnn, splash, xla
from gptjax.model.layers import compute_dtype, platform as current_platform

PREFERRED = {"cuda": "cudnn", "tpu": "splash", "cpu": "blocked"}  # what `auto` runs where it applies


@dataclasses.dataclass(frozen=True)
class Choice:
  kernel: str  # cudnn, splash, xla or blocked
  why: str  # for the start-up report


def why_not(kernel: str, cfg: ModelConfig, seq_len: int, platform: str) -> str | None:
  """Why `kernel` cannot attend over `seq_len` positions of this model on `platform`; None if it can."""
  dtype = jnp.dtype(compute_dtype(cfg, platform)).name
  if kernel == "cudnn":
    if platform != "cuda":
      return f"cuDNN's fused attention needs an NVIDIA GPU, and this runs on {platform}"
    limit = cudnn.max_head_size()
    if dtype not in ("bfloat16", "float16"):
      return f"cuDNN's fused attention takes bfloat16 or float16, not {dtype} (set model.dtype=bfloat16)"
    if cfg.head_size % cudnn.HEAD_SIZE_MULTIPLE or cfg.head_size > limit:
      return f"cuDNN's fused attention needs a head size that is a multiple of 8 up to {limit}, not {cfg.head_size}"
  if kernel == "splash":
    if platform not in ("tpu", "cpu"):
      return f"splash attention is a TPU kernel, and this runs on {platform}"
    if seq_len % splash.BLOCK_MULTIPLE:
      return f"splash attention needs a sequence length that is a multiple of 128, not {seq_len}"
  return None


def choose(cfg: ModelConfig, seq_len: int, platform: str | None = None, *, strict: bool = True) -> Choice:
  """The kernel that attends over `seq_len` positions (default platform: the one traced for).
  An explicit `model.attention` that cannot run is a UserError, or with strict=False (a prompt
  of another length) `auto`'s choice."""
  platform = platform or current_platform()
  if cfg.attention != "auto":
    reason = why_not(cfg.attention, cfg, seq_len, platform)
    if reason is None:
      interpreted = " (Pallas interpret mode on the CPU: slow)" if cfg.attention == "splash" and platform == "cpu" else ""
      return Choice(cfg.attention, f"model.attention={cfg.attention}{interpreted}")
    if strict:
      raise UserError(f"model.attention={cfg.attention} cannot run here: {reason}")
    fallback = choose(dataclasses.replace(cfg, attention="auto"), seq_len, platform)
    return Choice(fallback.kernel, f"model.attention={cfg.attention} cannot run at length {seq_len}: {reason}")
  preferred = PREFERRED.get(platform, "xla")
  reason = why_not(preferred, cfg, seq_len, platform)
  if reason is None:
    return Choice(preferred, f"auto on {platform}")
  return Choice("xla", f"auto on {platform}: {reason}")


def report(cfg: ModelConfig, seq_len: int, platform: str | None = None) -> str:
  """The start-up line: which kernel attends and why, and the matmuls' dtype (raises as `choose` does)."""
  choice = choose(cfg, seq_len, platform)
  return f"attention: {choice.kernel} ({choice.why}); matmuls in {jnp.dtype(compute_dtype(cfg, platform)).name}"


def causal_attention(q_BTHK, k_BTGK, v_BTGK, cfg: ModelConfig, segments_BT=None):
  """Causal attention by the kernel `choose` picks for this sequence length; with `segments_BT`
  (int [B, T]), only among the positions of one segment (document)."""
  choice = choose(cfg, q_BTHK.shape[1], strict=False)
  if choice.kernel == "cudnn":
    return per_shard(cudnn.causal_attend, q_BTHK, k_BTGK, v_BTGK, segments_BT)
  if choice.kernel == "splash":
    attend = lambda *args: splash.causal_attend(*args, interpret=current_platform() == "cpu")  # noqa: E731
    return per_shard(attend, q_BTHK, k_BTGK, v_BTGK, segments_BT)
  return (xla if choice.kernel == "xla" else blocked).causal_attend(q_BTHK, k_BTGK, v_BTGK, segments_BT)


def per_shard(attend, q_BTHK, k_BTGK, v_BTGK, segments_BT=None):
  """`attend(q, k, v, segments)` on each device's rows and heads (`jax.shard_map`), split by the
  rules table as the activations are: the batch over the batch axes (data, fsdp, expert), the heads over tensor where it
  divides both the query and the key/value heads (else every tensor shard takes all heads); the
  segments by rows. Without a mesh, as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attend(q_BTHK, k_BTGK, v_BTGK, segments_BT)

  q_spec = sharding.fit(sharding.logical_to_spec(("batch", "sequence", "heads", "kv")), q_BTHK.shape, mesh)
  kv_spec = sharding.fit(sharding.logical_to_spec(("batch", "sequence", "kv_heads", "kv")), k_BTGK.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # a query head must meet its key/value head on the same shard
    q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
  if segments_BT is None:
    return jax.shard_map(lambda q, k, v: attend(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q_BTHK, k_BTGK, v_BTGK)
  return jax.shard_map(attend, in_specs=(q_spec, kv_spec, kv_spec, P(*q_spec[:2])), out_specs=q_spec,
                       check_vma=False)(q_BTHK, k_BTGK, v_BTGK, segments_BT)
