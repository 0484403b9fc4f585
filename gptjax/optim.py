"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping, decay on matrices only."""

import jax
import optax

from gptjax.config import OptimConfig


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_iters,
      decay_steps=cfg.lr_decay_iters, end_value=cfg.min_lr)


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings), not on biases or LayerNorm scales.

  Chosen by name, not by rank: the attention bias has shape [3, heads, head_dim].
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
