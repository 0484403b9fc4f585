"""cuDNN's fused (flash) attention on NVIDIA GPUs (`model.attention=cudnn`, what `auto` runs on a
GPU where it applies): `jax.nn.dot_product_attention(implementation="cudnn")`, which lowers to the
custom calls `__cudnn$fmhaSoftmax` and, for the gradient, `__cudnn$fmhaSoftmaxBackward`; the
[T, T] scores never reach memory. It takes bfloat16 or float16, a head size that is a multiple of
8 up to 128 (256 on Hopper and later), and grouped-query heads as they are. It runs per shard
(`kernels.per_shard`): each device attends over its own rows and heads."""

import jax

from gptjax.model import documents

HEAD_SIZE_MULTIPLE = 8


def max_head_size() -> int:
  """cuDNN's largest head size on this machine's GPU: 256 from Hopper (compute capability 9.0) on,
  else 128 (also when lowering without a GPU)."""
  gpus = [d for d in jax.local_devices() if d.platform == "gpu" and hasattr(d, "compute_capability")]
  hopper = gpus and tuple(int(x) for x in gpus[0].compute_capability.split(".")) >= (9, 0)
  return 256 if hopper else 128


def causal_attend(q_BTHK, k_BTGK, v_BTGK, segments_BT=None):
  """Queries [B, T, heads, head_dim] over keys and values [B, T, kv_heads, head_dim], causally
  (and within each position's segment, given segment ids [B, T]: a [B, 1, T, T] mask, which cuDNN
  takes as a bias; the scores stay in the kernel)."""
  mask_B1TT = None if segments_BT is None else documents.same_document(segments_BT, segments_BT)[:, None]
  return jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, mask=mask_B1TT, is_causal=True, implementation="cudnn")
