"""The train and eval steps, compiled ahead of time over a device mesh, and the state they carry.

The train step is one `jax.jit` with the state's shardings in and out (donated): gradients are
averaged over the micro-batches of a batch [accum, batch, block] by a `lax.scan` inside it, then
Optax updates the parameters (or, if the gradients are not finite, skips the update and counts
it, all on the device). Both steps are traced under `jax.set_mesh`, so that the model's
activation constraints bind.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from gptjax import config as config_lib
from gptjax import metrics as metrics_lib
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax.model import documents as documents_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # a pure dict of arrays
  opt_state: Any


def make_train_step(cfg: config_lib.ModelConfig, tx: optax.GradientTransformation, schedule, seed: int,
                    optim_cfg: config_lib.OptimConfig = config_lib.OptimConfig(),
                    split_documents: Callable | None = None):
  """`split_documents`: inputs [B, T] -> `documents.Documents` (document masking), or None."""
  z_loss = optim_cfg.z_loss
  router_weights = {"router_balance": optim_cfg.router_aux_loss, "router_z": optim_cfg.router_z_loss}

  def loss_fn(params, inputs, targets, dropout_key):
    """What is differentiated: the cross-entropy, plus z_loss times the mean squared log-partition
    (PaLM's z-loss), plus a mixture's router losses with their weights; aside, (the cross-entropy,
    that mean square, the router losses)."""
    nll_BT, log_partition_BT, router = model_lib.bind(cfg, params).losses(
        inputs, targets, dropout_key=dropout_key, documents=split_documents and split_documents(inputs))
    nll, z_square = nll_BT.mean(), jnp.square(log_partition_BT).mean()
    loss = nll + z_loss * z_square if z_loss else nll
    loss = loss + sum(router_weights[name] * value for name, value in router.items())
    return loss, (nll, z_square, router)

  def train_step(state: TrainState, inputs, targets):
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)

    def micro_step(grad_sum, micro):
      index, micro_inputs, micro_targets = micro
      dropout_key = jax.random.fold_in(step_key, index) if cfg.dropout > 0 else None
      (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, micro_inputs, micro_targets, dropout_key)
      return jax.tree.map(jnp.add, grad_sum, grads), losses

    accum = inputs.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, (nll, z_square, router) = jax.lax.scan(micro_step, zeros, (jnp.arange(accum), inputs, targets))
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    grad_norms = metrics_lib.norms_by_group(grads, cfg.layer_stacks())  # the global norm from the same sums
    metrics = {"loss": nll.mean(), "grad_norm": jnp.sqrt(sum(jnp.square(n) for n in grad_norms.values())),
               "lr": schedule(state.step), "grad_norms": grad_norms,
               **({"z_loss": z_loss * z_square.mean()} if z_loss else {}),
               **{name: value.mean() for name, value in router.items()},  # unweighted, as the log shows them
               **optim.non_finite_steps(opt_state)}
    return new_state, metrics

  return train_step


def make_eval_step(cfg: config_lib.ModelConfig, split_documents: Callable | None = None):
  def eval_step(params, inputs, targets):  # inputs, targets: [1, batch, block]
    documents = split_documents and split_documents(inputs[0])
    return model_lib.bind(cfg, params).nll(inputs[0], targets[0], documents=documents).mean()

  return eval_step


def state_shardings(cfg: config_lib.ModelConfig, tx, mesh) -> tuple[TrainState, TrainState]:
  """(abstract TrainState: ShapeDtypeStructs carrying their shardings, the shardings) by the rules."""
  shapes, names = model_lib.abstract_params(cfg)
  param_shardings = sharding.param_shardings(shapes, names, mesh)
  abstract_opt = jax.eval_shape(tx.init, shapes)
  opt_shardings = _like_params(abstract_opt, shapes, param_shardings, sharding.replicated(mesh))
  shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), shapes, abstract_opt)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def _like_params(opt_state, shapes, param_shardings, replicated):
  """Shardings for an optimizer state: a leaf whose key path ends in a parameter's, with its shape
  (moments, momentum), is split as that parameter; any other (counters, Adafactor's factored rows
  and columns) is replicated. By path, not by tree structure: Muon's masked states hold parts."""
  by_path = {tuple(path): (leaf.shape, s) for (path, leaf), s in
             zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(param_shardings))}
  depths = sorted({len(path) for path in by_path}, reverse=True)

  def place(path, leaf):
    for depth in depths:
      shape, param_sharding = by_path.get(tuple(path[-depth:]), (None, None))
      if shape == leaf.shape:
        return param_sharding
    return replicated

  return jax.tree_util.tree_map_with_path(place, opt_state)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled steps and the state layout they were compiled for."""
  train: Callable  # (TrainState, inputs, targets) -> (TrainState, metrics)
  eval: Callable  # (params, inputs, targets) -> mean loss
  abstract: TrainState  # ShapeDtypeStructs with shardings: the restore target
  shardings: TrainState


def lower_steps(cfg: config_lib.Config, tx, schedule, mesh, platform: str | None = None,
                document_start: int | None = None):
  """(train step, eval step) lowered over `mesh` for `platform` (default: its devices'), with the
  abstract state and its shardings. Lowering for another platform needs `model.lowering_for` too.
  `document_start`: the token opening each document, for document masking (None: no masking)."""
  split_documents = None if document_start is None else functools.partial(
      documents_lib.split, start_id=document_start, restart_positions=cfg.data.document_positions)
  abstract, shardings = state_shardings(cfg.model, tx, mesh)
  batches = sharding.batch_sharding(mesh)
  platforms = None if platform is None else (platform,)
  micro_batch, accum_steps = cfg.train.micro_batches(sharding.batch_shards(mesh))

  def batch_spec(accum):
    return jax.ShapeDtypeStruct((accum, micro_batch, cfg.model.block_size), jnp.int32, sharding=batches)

  with jax.set_mesh(mesh):
    train_step = jax.jit(
        make_train_step(cfg.model, tx, schedule, cfg.train.seed, cfg.optim, split_documents),
        in_shardings=(shardings, batches, batches), out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    ).trace(abstract, batch_spec(accum_steps), batch_spec(accum_steps))
    eval_step = jax.jit(
        make_eval_step(cfg.model, split_documents), in_shardings=(shardings.params, batches, batches),
        out_shardings=sharding.replicated(mesh),
    ).trace(abstract.params, batch_spec(1), batch_spec(1))
    return (train_step.lower(lowering_platforms=platforms), eval_step.lower(lowering_platforms=platforms),
            abstract, shardings)


def compile_steps(cfg: config_lib.Config, tx, schedule, mesh, document_start: int | None = None) -> Steps:
  train_step, eval_step, abstract, shardings = lower_steps(cfg, tx, schedule, mesh, document_start=document_start)
  return Steps(train_step.compile(), eval_step.compile(), abstract, shardings)


def init_state(cfg: config_lib.ModelConfig, tx, shardings: TrainState, seed: int) -> TrainState:
  """A freshly initialised model and optimizer, created directly in their shardings."""
  def init(key):
    params = model_lib.init_params(cfg, key)
    return TrainState(jnp.int32(0), params, tx.init(params))

  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def start_from(params, tx, shardings: TrainState) -> TrainState:
  """Step 0 with given parameters (fine-tuning) and a fresh optimizer."""
  return jax.jit(lambda params: TrainState(jnp.int32(0), params, tx.init(params)),
                 out_shardings=shardings, donate_argnums=0)(params)
