"""The GPT model (GPT-2, or the Llama / Qwen family by configuration) in Flax NNX, one file per building block (attention, MLP, the transformer), and
the functions the rest of gptjax uses to make, count and run it on plain parameter trees.

Parameters travel as a pure dict of arrays (what Optax updates and Orbax saves); inside a jitted
function `bind` merges them with the model's static graph, so no step pays a Python graph
traversal beyond its trace.
"""

import functools

import jax
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model.attention import KVCache
from gptjax.model.layers import compute_dtype, logical_axes, lowering_for, platform
from gptjax.model.transformer import GPT

__all__ = ["GPT", "KVCache", "init_params", "abstract_params", "bind", "compute_dtype", "count_params", "active_params",
           "flops_per_token", "forward_with_intermediates", "lowering_for", "platform"]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Freshly initialised parameters, a pure dict of arrays."""
  return nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))


@functools.cache
def _abstract(cfg: ModelConfig, target: str):
  """The model's static graph (its layers' dtypes follow `target`'s: see `layers.compute_dtype`),
  made outside any mesh: `gptjax.sharding` places the parameters, not NNX."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state), logical_axes(state)


def abstract_params(cfg: ModelConfig) -> tuple[dict, dict]:
  """(ShapeDtypeStructs, logical axis names) of the parameters, as pure dicts; no memory used."""
  _, shapes, names = _abstract(cfg, platform())
  return shapes, names


def bind(cfg: ModelConfig, params: dict) -> GPT:
  """The model with `params` (arrays or tracers) in place, for calling inside a jitted function."""
  return nnx.merge(_abstract(cfg, platform())[0], params)


@functools.partial(jax.jit, static_argnames="cfg")
def forward_with_intermediates(cfg: ModelConfig, params: dict, tokens_BT: jax.Array) -> tuple[jax.Array, dict]:
  """(logits [B, T, vocab], what every stage computed): one forward pass under `nnx.capture`, which
  keeps what the model's `sow` calls name. A nested dict: the stages before and after the blocks,
  and `blocks`, a tuple of one dict per layer (its attention and MLP stages in `attn` and `mlp`)."""
  logits_BTV, kept = nnx.capture(bind(cfg, params), nnx.Intermediate)(tokens_BT)
  return logits_BTV, {name: value if name == "blocks" else value[0]  # sow keeps a tuple of what it was given
                      for name, value in nnx.to_pure_dict(kept).items()}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def active_params(cfg: ModelConfig) -> int:
  """The parameters one token uses: all but the experts it does not choose (a mixture's
  experts_per_token of n_experts); all of them in a dense model."""
  shapes = abstract_params(cfg)[0]
  if not cfg.n_experts:
    return count_params(shapes)
  experts = count_params([shapes["h"]["mlp"][name] for name in ("c_fc", "c_proj")])
  return count_params(shapes) - experts + experts * cfg.experts_per_token // cfg.n_experts


def flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token as PaLM (appendix B) and nanoGPT count them: 6 per parameter that
  multiplies (all but the tables that are only looked up: the position table, and the token table
  when the head is a matrix of its own; of a mixture's experts, the ones each token chooses) plus
  12 * n_layer * n_head * head_dim * block_size for the attention scores and their weighted sum.
  Recomputation is not counted."""
  n_params = active_params(cfg)
  looked_up = (cfg.position_limit * cfg.n_embd if cfg.positions == "learned" else 0) + \
      (0 if cfg.tie_embeddings else cfg.padded_vocab * cfg.n_embd)
  return 6 * (n_params - looked_up) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size
