"""What every layer shares: the compute dtype and parameters named by logical axes.

A parameter's logical axis names (vocab, embed, heads, kv, mlp, and layers for the stacked
blocks) are kept as NNX metadata (`out_sharding`). `gptjax.sharding` maps the names onto the
device mesh with one rules table and places the arrays itself, so NNX's own eager placement
is switched off.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  if cfg.dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(cfg.dtype)


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
