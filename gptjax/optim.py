"""The optimizer and its learning-rate schedule: AdamW, Muon, Lion or Adafactor (`optim.name`),
after global-norm clipping; cosine, WSD, linear or constant schedules (`optim.schedule`), each
after a linear warmup. An update whose gradients are not finite is skipped (on the device) and
counted.

Muon (Jordan et al. 2024, `optax.contrib.muon`) orthogonalises the momentum of the hidden layers'
weight matrices; the embeddings, the LM head, norms and biases stay with AdamW, as the Muon
authors, Moonshot and MaxText do. Which axes of a kernel are the matrix comes from its logical
axis names: a projection out of the residual stream reduces over `embed` (c_attn, q_attn,
kv_attn, c_fc), one into it outputs `embed` (the c_proj kernels); the stacked `layers` axis and
unnamed axes (q/k/v, gate/up) are batch axes, one matrix each. Updates are scaled to AdamW's RMS
(`optim.muon_rms`, Moonshot's "consistent RMS"), so the same learning rate and weight decay serve.
"""

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from gptjax import model as model_lib
from gptjax.config import ModelConfig
from gptjax.config import OptimConfig

BATCH_AXES = ("layers", "experts", None)  # axes of a stacked kernel that are not its matrix's


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_iters`, then down to `min_lr` at
  `lr_decay_iters` (and `min_lr` after): cosine; linear; WSD (constant, then the last
  `decay_fraction` of the steps decaying by `decay_shape`); or constant (no decay)."""
  peak, floor, warmup, end = cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, end, floor)
  warm = optax.linear_schedule(0.0, peak, warmup)
  if cfg.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  decay_start = wsd_decay_start(cfg) if cfg.schedule == "wsd" else warmup
  shape = cfg.decay_shape if cfg.schedule == "wsd" else "linear"

  def decay(step):  # from the peak at decay_start down to the floor at end
    done = jnp.clip(step / (end - decay_start), 0.0, 1.0)
    left = {"linear": 1 - done, "sqrt": 1 - jnp.sqrt(done), "cosine": 0.5 * (1 + jnp.cos(jnp.pi * done))}[shape]
    return floor + (peak - floor) * left

  return optax.join_schedules([warm, optax.constant_schedule(peak), decay], [warmup, decay_start])


def wsd_decay_start(cfg: OptimConfig) -> int:
  """The step WSD's decay starts at: `decay_fraction` of `lr_decay_iters` before its end."""
  return min(cfg.lr_decay_iters - 1, max(cfg.warmup_iters, round(cfg.lr_decay_iters * (1 - cfg.decay_fraction))))


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings), not on biases or LayerNorm scales.

  Chosen by name, not by rank: the attention bias has shape [3, heads, head_dim].
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def muon_dimensions(axes: tuple) -> contrib.MuonDimensionNumbers | None:
  """The matrix of a parameter with logical `axes`, for Muon; None: AdamW's (embeddings, the head,
  norms, biases: anything without `embed` and another named axis, or with `vocab`)."""
  named = [i for i, name in enumerate(axes) if name not in BATCH_AXES]
  embed = [i for i in named if axes[i] == "embed"]
  if len(named) < 2 or len(embed) != 1 or "vocab" in axes:
    return None
  rest = tuple(i for i in named if i != embed[0])
  if named[0] == embed[0]:  # out of the residual stream: [embed, ...] -> [...]
    return contrib.MuonDimensionNumbers(reduction_axis=tuple(embed), output_axis=rest)
  return contrib.MuonDimensionNumbers(reduction_axis=rest, output_axis=tuple(embed))


def _muon(cfg: OptimConfig, schedule, model: ModelConfig) -> optax.GradientTransformation:
  """Muon on the hidden matrices, AdamW (as optim.name=adamw) on every other parameter."""
  _, names = model_lib.abstract_params(model)
  dims = jax.tree.map(muon_dimensions, names, is_leaf=lambda x: isinstance(x, tuple))  # axes are tuples
  is_dims = lambda x: x is None or isinstance(x, contrib.MuonDimensionNumbers)  # noqa: E731
  labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dims, is_leaf=is_dims)
  by_path = dict(jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_dims)[0])

  def muon_dims(masked):  # the muon leaves' numbers, in the shape of the tree optax.partition hands it
    return jax.tree_util.tree_map_with_path(lambda path, _: by_path[path], masked)

  matrices = contrib.muon(schedule, beta=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                          muon_weight_dimension_numbers=muon_dims, consistent_rms=cfg.muon_rms)
  return optax.partition({"muon": matrices, "adamw": _adamw(cfg, schedule)}, labels)


def _adamw(cfg: OptimConfig, schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)


def make_optimizer(cfg: OptimConfig, model: ModelConfig) -> optax.GradientTransformation:
  schedule = lr_schedule(cfg)
  if cfg.name == "muon":
    update = _muon(cfg, schedule, model)
  elif cfg.name == "lion":
    update = optax.lion(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "adafactor":  # factored second moments and no momentum: the least optimizer state
    # Steps in AdamW's units (not relative to each parameter's scale), with AdamW's decoupled decay.
    update = optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                         optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.scale_by_learning_rate(schedule))
  else:
    update = _adamw(cfg, schedule)
  inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), update) if cfg.grad_clip > 0 else update
  # Never gives up skipping: when to stop a run of non-finite steps is the training loop's call.
  return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)


def non_finite_steps(opt_state) -> dict:
  """{"bad_steps": consecutive skipped updates up to now, "skipped": all skipped} of `opt_state`."""
  return {"bad_steps": opt_state.notfinite_count, "skipped": opt_state.total_notfinite}
