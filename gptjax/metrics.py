"""What training reports about itself: throughput, MFU, memory per device and the KV cache's size."""

import resource
import time

import jax
import jax.numpy as jnp

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sharding

# Dense (no sparsity) bfloat16 peak FLOP/s per JAX device, by the exact device kind JAX reports (for
# NVIDIA GPUs, CUDA's device name; prefixes differ: "NVIDIA H100 PCIe" is not SXM's 989 TFLOP/s).
# Sources: NVIDIA's H100 datasheet (SXM 989, PCIe 756, NVL 835), H200 page (989; NVL 835), A100
# datasheet (312), L4 page (121), Blackwell datasheet (B200 2,250; GB200 2,500 per GPU); AMD's MI300X
# and MI325X pages (1,307.4); Google Cloud's TPU docs (v4 275, v5e 197, v5p 459, v6e 918 per chip;
# TPU7x 2,307 per chip, which JAX shows as two devices).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA B200": 2250e12, "NVIDIA GB200": 2500e12,
    "AMD Instinct MI300X": 1307.4e12, "AMD Instinct MI325X": 1307.4e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU7x": 2307e12 / 2,
}


def norms_by_group(tree: dict, layer_stacks: tuple = ()) -> dict:
  """The L2 norm of each group of a parameter-shaped tree: every layer of the stacked blocks
  ("layer_00", ...; where each is, `ModelConfig.layer_stacks`, default: all in h), then each other
  top-level module (wte, wpe, ln_f, lm_head)."""
  stacks = [name for name in ("h", "h_dense") if name in tree]
  squares = {name: sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(sub))
             for name, sub in tree.items() if name not in stacks}
  per_layer = {name: sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim)))
                         for leaf in jax.tree.leaves(tree[name])) for name in stacks}  # [layers in the stack]
  if "h_dense" in tree and not layer_stacks:
    raise ValueError("a tree with dense layers among sparse ones (h_dense) needs their places (layer_stacks)")
  layer_stacks = layer_stacks or tuple(("h", i) for i in range(len(per_layer["h"])))
  width = len(str(len(layer_stacks) - 1))
  squares |= {f"layer_{i:0{width}d}": per_layer[stack][index] for i, (stack, index) in enumerate(layer_stacks)}
  return {name: jnp.sqrt(square) for name, square in squares.items()}


# The parameters' norms, computed at log steps only (the train step returns the gradients' own).
param_norms = jax.jit(norms_by_group, static_argnums=1)


def peak_flops(device_kind: str) -> float:
  """The table's peak for a device kind, matched exactly; 0 if it is not in the table."""
  return PEAK_FLOPS.get(device_kind, 0.0)


def peak_flops_per_device(cfg: config_lib.TrainConfig) -> float:
  if cfg.peak_flops_per_device > 0:
    return cfg.peak_flops_per_device
  return peak_flops(jax.devices()[0].device_kind)


class Throughput:
  """Tokens/s and MFU over the steps since the last `reset` (or measurement)."""

  def __init__(self, cfg: config_lib.Config, step: int):
    self.tokens_per_step = cfg.tokens_per_step
    self.flops_per_step = model_lib.flops_per_token(cfg.model) * self.tokens_per_step
    self.peak = peak_flops_per_device(cfg.train) * jax.device_count()
    self.reset(step)

  def reset(self, step: int) -> None:
    """Start counting afresh: what ran since (evaluation, saving) is not training throughput."""
    self.since_time, self.since_step = time.perf_counter(), step

  def measure(self, step: int) -> tuple[float, float | None]:
    """(tokens/s, MFU as a fraction; None without a known peak) since the last call; the caller
    has waited for `step` to finish."""
    now = time.perf_counter()
    steps_per_s = (step - self.since_step) / (now - self.since_time)
    self.since_time, self.since_step = now, step
    return self.tokens_per_step * steps_per_s, self.flops_per_step * steps_per_s / self.peak if self.peak else None


def memory_in_use() -> dict[str, float]:
  """MiB: the first local device's memory in use and its peak (where the backend reports them:
  GPUs and TPUs), and this process's peak resident memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  sizes = {"device_in_use_mib": stats.get("bytes_in_use"), "device_peak_mib": stats.get("peak_bytes_in_use"),
           "host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
  return {name: size / 2**20 for name, size in sizes.items() if size is not None}


def memory_per_device(abstract, shardings, compiled_step) -> dict[str, int]:
  """Bytes per device: parameters and optimizer state from their shardings; gradients and
  activations from XLA's buffer assignment for the compiled step (its temporaries)."""
  analysis = compiled_step.memory_analysis()
  return {"parameters": sharding.bytes_per_device(abstract.params, shardings.params),
          "optimizer state": sharding.bytes_per_device(abstract.opt_state, shardings.opt_state),
          "gradients and activations": analysis.temp_size_in_bytes if analysis is not None else 0}


def memory_report(abstract, shardings, compiled_step) -> str:
  sizes = memory_per_device(abstract, shardings, compiled_step)
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  return (f"memory per device: parameters {sizes['parameters'] / 2**20:,.1f} MiB, optimizer state "
          f"{sizes['optimizer state'] / 2**20:,.1f} MiB, gradients and activations "
          f"{sizes['gradients and activations'] / 2**20:,.1f} MiB (XLA), total {sum(sizes.values()) / 2**20:,.1f} MiB"
          + (f" of {limit / 2**20:,.0f} MiB" if limit else ""))


def peak_report(cfg: config_lib.TrainConfig) -> str | None:
  """A start-up line where MFU cannot be known (a device kind the table lacks), else None."""
  if peak_flops_per_device(cfg):
    return None
  return (f"MFU n/a: no peak FLOP/s known for device kind {jax.devices()[0].device_kind!r}; "
          "set train.peak_flops_per_device")


def kv_cache_bytes(cfg: config_lib.ModelConfig) -> int:
  """The key/value cache that sampling fills, per sequence of the full context."""
  return 2 * cfg.n_layer * cfg.block_size * cfg.kv_heads * cfg.head_size * jnp.dtype(model_lib.compute_dtype(cfg)).itemsize


def kv_cache_report(cfg: config_lib.ModelConfig) -> str:
  """The KV cache holds only the key/value heads: grouped-query attention makes it n_head /
  n_kv_head times smaller."""
  return (f"KV cache for sampling: {kv_cache_bytes(cfg) / 2**20:,.2f} MiB per sequence of {cfg.block_size} tokens "
          f"({cfg.kv_heads} key/value heads for {cfg.n_head} query heads)")
