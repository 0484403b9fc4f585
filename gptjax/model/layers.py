"""What every layer shares: the compute dtype and parameters named by logical axes.

A parameter's logical axis names (vocab, embed, heads, kv, mlp, and layers for the stacked
blocks) are kept as NNX metadata (`out_sharding`). `gptjax.sharding` maps the names onto the
device mesh with one rules table and places the arrays itself, so NNX's own eager placement
is switched off.
"""

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import SCAN_FROM_LAYERS, ModelConfig

_lowering_target: list[str] = []  # set by `lowering_for`


def platform() -> str:
  """The platform the model is traced for: cpu, cuda, rocm or tpu (this process's devices', or
  the target of `lowering_for`). It decides `dtype=auto` and `attention=auto`."""
  if _lowering_target:
    return _lowering_target[-1]
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  client = getattr(jax.devices()[0], "client", None)
  return "rocm" if "rocm" in getattr(client, "platform_version", "").lower() else "cuda"


@contextlib.contextmanager
def lowering_for(target: str):
  """Traces inside are for `target` (cuda, tpu, ...), not this machine's devices: for lowering a
  step for hardware that is not here (`gptjax lower`)."""
  _lowering_target.append(target)
  try:
    yield
  finally:
    _lowering_target.pop()


def compute_dtype(cfg: ModelConfig, target: str | None = None) -> jnp.dtype:
  """The matmuls' dtype: model.dtype, where auto is float32 on a CPU and bfloat16 elsewhere.
  Parameters, norms' statistics, softmax, the LM head's output and the loss stay float32."""
  if cfg.dtype == "auto":
    return jnp.float32 if (target or platform()) == "cpu" else jnp.bfloat16
  return jnp.dtype(cfg.dtype)


def scanned(cfg: ModelConfig, target: str | None = None) -> bool:
  """Whether the blocks run as one lax.scan: model.scan_layers, where auto scans on accelerators
  and, on a CPU, stacks of SCAN_FROM_LAYERS or more (shallower ones step faster looped)."""
  setting = str(cfg.scan_layers).lower()
  if setting != "auto":
    return setting == "true"
  return (target or platform()) != "cpu" or cfg.n_layer >= SCAN_FROM_LAYERS


def scan_report(cfg: ModelConfig) -> str:
  """The start-up line: whether the blocks are scanned, and why."""
  stacks = [stack for stack, _ in cfg.layer_stacks()]
  runs = 1 + sum(a != b for a, b in zip(stacks, stacks[1:]))  # of dense and sparse layers (model.dense_layers)
  how = "looped (unrolled: faster steps on CPU)" if not scanned(cfg) else \
      "scanned (one lax.scan: compile time flat in depth)" if runs == 1 else \
      f"scanned ({runs} lax.scans, one per run of dense or sparse layers: compile time grows with the runs)"
  setting = str(cfg.scan_layers).lower()
  why = f"model.scan_layers={setting}" if setting != "auto" else (
      f"auto on {platform()}" + (f", {SCAN_FROM_LAYERS} layers or more scan" if platform() == "cpu" else ""))
  return f"blocks: {cfg.n_layer} {how} ({why})"


def axes(*names: str | None) -> dict:
  """NNX parameter metadata naming each dimension's logical axis."""
  return {"out_sharding": names, "eager_sharding": False}


def logical_axes(state: nnx.State):
  """The logical axis names of every parameter in `state`, as a pure dict of tuples."""
  return nnx.to_pure_dict(jax.tree.map(
      lambda v: v.replace(v.get_metadata().get("out_sharding")), state,
      is_leaf=lambda v: isinstance(v, nnx.Variable)))


def capturing(module: nnx.Module) -> bool:
  """Whether `module` runs under `nnx.capture` (which marks every module it records from)."""
  return hasattr(module, "__captures__")


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
  """Keeps `value` as `module`'s intermediate `name` when it runs under `nnx.capture` (what
  `gptjax explain` and `gptjax attention` read); in training and sampling, nothing."""
  if capturing(module):
    module.sow(nnx.Intermediate, name, value)


def norm(cfg: ModelConfig, size: int | None = None, axis: str = "embed", *, rngs: nnx.Rngs):
  """The configured normalisation over the last axis (`size`, default n_embd): GPT-2's LayerNorm
  (with a bias if the model has biases) or RMSNorm."""
  size = size or cfg.n_embd
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(size, epsilon=cfg.layer_norm_epsilon, dtype=compute_dtype(cfg),
                       scale_metadata=axes(axis), rngs=rngs)
  return nnx.LayerNorm(size, epsilon=cfg.layer_norm_epsilon, use_bias=cfg.bias, dtype=compute_dtype(cfg),
                       scale_metadata=axes(axis), bias_metadata=axes(axis), rngs=rngs)


def soft_cap(logits, cap: float):
  """Gemma 2's logit soft cap: cap * tanh(logits / cap), within (-cap, cap); 0: unchanged."""
  return cap * jnp.tanh(logits / cap) if cap else logits


@jax.custom_vjp
def float32_logits(x_BTD, table_VD):
  """x [B, T, embd] times the head's table [vocab, embd] (inputs in the compute dtype) -> float32
  logits [B, T, vocab], accumulated in float32. Its gradient casts the logits' float32 gradient to
  the inputs' dtype before its two matmuls (float32 accumulation): left to JAX, the largest
  matmuls of the backward pass would run in float32."""
  return jnp.einsum("btd,vd->btv", x_BTD, table_VD, preferred_element_type=jnp.float32)


def _float32_logits_forward(x_BTD, table_VD):
  return float32_logits(x_BTD, table_VD), (x_BTD, table_VD)


def _float32_logits_backward(saved, dlogits_BTV):
  x_BTD, table_VD = saved
  dlogits_BTV = dlogits_BTV.astype(x_BTD.dtype)
  dx_BTD = jnp.einsum("btv,vd->btd", dlogits_BTV, table_VD, preferred_element_type=jnp.float32)
  dtable_VD = jnp.einsum("btv,btd->vd", dlogits_BTV, x_BTD, preferred_element_type=jnp.float32)
  return dx_BTD.astype(x_BTD.dtype), dtable_VD.astype(table_VD.dtype)


float32_logits.defvjp(_float32_logits_forward, _float32_logits_backward)
