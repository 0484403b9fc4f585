"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping, decay on matrices only;
an update whose gradients are not finite is skipped (on the device) and counted."""

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
  inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
  # Never gives up skipping: when to stop a run of non-finite steps is the training loop's call.
  return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)


def non_finite_steps(opt_state) -> dict:
  """{"bad_steps": consecutive skipped updates up to now, "skipped": all skipped} of `opt_state`."""
  return {"bad_steps": opt_state.notfinite_count, "skipped": opt_state.total_notfinite}
