"""Training: a jitted, sharded, donated train step; periodic evaluation; checkpoints; resume.

    gptjax train shakespeare_char_cpu                    # a named config (configs/*.yaml)
    gptjax train shakespeare_char_cpu train.max_iters=500 model.dropout=0.1
    gptjax train shakespeare_char_cpu --resume           # continue from the latest checkpoint
"""

import argparse
import dataclasses
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from gptjax import checkpoint
from gptjax import config as config_lib
from gptjax import data
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax.errors import UserError

# Dense bf16 peak FLOP/s per chip, matched against jax.Device.device_kind, for MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def cross_entropy(logits, targets):
  """Mean next-token cross-entropy. logits: [B, T, V] float32, targets: int [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(model: model_lib.GPT, tx: optax.GradientTransformation, schedule, seed: int):
  """One optimizer step over a batch [accum, batch, block]: gradients are averaged over the
  micro-batches (lax.scan, one compiled step) before the AdamW update."""

  def loss_fn(params, inputs, targets, rng):
    logits = model.apply({"params": params}, inputs, deterministic=False, rngs={"dropout": rng})
    return cross_entropy(logits, targets)

  def train_step(state: TrainState, inputs, targets):
    step_rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def micro_step(grad_sum, micro):
      index, micro_inputs, micro_targets = micro
      loss, grads = jax.value_and_grad(loss_fn)(
          state.params, micro_inputs, micro_targets, jax.random.fold_in(step_rng, index))
      return jax.tree.map(jnp.add, grad_sum, grads), loss

    accum = inputs.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, losses = jax.lax.scan(micro_step, zeros, (jnp.arange(accum), inputs, targets))
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    metrics = {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return new_state, metrics

  return train_step


def make_eval_step(model: model_lib.GPT):
  def eval_step(params, inputs, targets):  # inputs, targets: [1, batch, block]
    return cross_entropy(model.apply({"params": params}, inputs[0]), targets[0])

  return eval_step


def state_shardings(cfg: config_lib.Config, tx, mesh):
  """Abstract TrainState (ShapeDtypeStructs with their shardings) from the logical-axis rules."""
  boxed = model_lib.abstract_params(cfg.model)
  param_shardings = sharding.param_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))
  shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt)
  return abstract, shardings


def _with_architecture(cfg: config_lib.Config, model: config_lib.ModelConfig) -> config_lib.Config:
  """`cfg` with `model`'s architecture; dropout, dtype and remat stay `cfg`'s."""
  m = cfg.model
  return dataclasses.replace(cfg, model=dataclasses.replace(model, dropout=m.dropout, dtype=m.dtype, remat=m.remat))


def _describe(tokenizer_meta: dict) -> str:
  return f"{tokenizer_meta['kind']}, {len(tokenizer_meta['chars'])} characters" \
      if tokenizer_meta["kind"] == "char" else tokenizer_meta["kind"]


def memory_report(abstract: TrainState, shardings: TrainState, compiled_step) -> str:
  """Bytes per device: parameters and optimizer state from their shardings; gradients and
  activations from XLA's buffer assignment for the compiled step (its temporaries)."""
  params = sharding.bytes_per_device(abstract.params, shardings.params)
  opt_state = sharding.bytes_per_device(abstract.opt_state, shardings.opt_state)
  analysis = compiled_step.memory_analysis()
  temporaries = analysis.temp_size_in_bytes if analysis is not None else 0
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  total = params + opt_state + temporaries
  return (f"memory per device: parameters {params / 2**20:,.1f} MiB, optimizer state {opt_state / 2**20:,.1f} MiB, "
          f"gradients and activations {temporaries / 2**20:,.1f} MiB (XLA), total {total / 2**20:,.1f} MiB"
          + (f" of {limit / 2**20:,.0f} MiB" if limit else ""))


def peak_flops_per_device(cfg: config_lib.TrainConfig) -> float:
  if cfg.peak_flops_per_device > 0:
    return cfg.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), 0.0)


def flops_per_token(cfg: config_lib.ModelConfig, n_params: int) -> float:
  """Training FLOPs per token: 6N for the matmuls plus the attention scores (PaLM, appendix B)."""
  return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def train(cfg: config_lib.Config, *, resume: bool = False, progress_bar: bool = True,
          devices=None) -> tuple[dict, TrainState]:
  """Trains as `cfg` says; returns the final {"step", "train_loss", "val_loss"} and TrainState.

  `devices` (default: all) are the devices the mesh is built from.
  """
  sharding.initialize_distributed(cfg.distributed)
  meta = data.load_meta(cfg.data.dir)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
  t = cfg.train

  manager = checkpoint.open_manager(t.out_dir, keep=t.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None and not resume:
    raise UserError(f"{t.out_dir} already holds checkpoints (latest step {latest}): pass --resume "
                    "to continue it, or set train.out_dir to a new directory")
  if resume and latest is None:
    raise UserError(f"--resume: no checkpoint in {t.out_dir}")
  if resume and not checkpoint.has_train_state(manager, latest):
    raise UserError(f"{t.out_dir} holds model weights only (no optimizer state), as an import does: "
                    f"fine-tune from it with train.init_from={t.out_dir} and a new train.out_dir")
  if t.init_from and not resume:
    source_cfg, source_tokenizer, source_step = checkpoint.read_run_config(t.init_from)
    if source_tokenizer != meta["tokenizer"]:
      raise UserError(f"{cfg.data.dir} was prepared with another tokenizer ({_describe(meta['tokenizer'])}) "
                      f"than {t.init_from} uses ({_describe(source_tokenizer)})")
    cfg = _with_architecture(cfg, source_cfg.model)
  if resume:
    saved_cfg, _ = checkpoint.read_config(manager, latest)
    if t.init_from:  # a fine-tuning run's architecture is the one it started from
      cfg = _with_architecture(cfg, saved_cfg.model)
    if saved_cfg.model != cfg.model:
      raise UserError(f"the model config differs from the checkpoint's in {t.out_dir}; "
                      f"saved: {saved_cfg.model}")

  mesh = sharding.make_mesh(cfg.mesh, devices)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.batch_size % n_batch_shards:
    raise UserError(f"train.batch_size={t.batch_size} is not divisible by data*fsdp={n_batch_shards}")

  model = model_lib.GPT(cfg.model)
  tx = optim.make_optimizer(cfg.optim)
  schedule = optim.lr_schedule(cfg.optim)
  abstract, shardings = state_shardings(cfg, tx, mesh)
  abstract_state = checkpoint.abstract_like(abstract, shardings)  # restore and compile targets

  batch_args = dict(batch_size=t.batch_size, block_size=cfg.model.block_size,
                    process_index=jax.process_index(), process_count=jax.process_count())
  train_tokens = data.load_tokens(cfg.data.dir, "train")
  val_tokens = data.load_tokens(cfg.data.dir, "val")
  train_batches = data.TokenBatches(train_tokens, accum_steps=t.grad_accum_steps, seed=t.seed,
                                    name="train", **batch_args)
  data.TokenBatches(val_tokens, name="val", **batch_args)  # checks the split is long enough

  if resume:
    params, opt_state, progress = checkpoint.restore_train_state(
        manager, latest, abstract_state.params, abstract_state.opt_state)
    state = TrainState(jax.device_put(jnp.int32(progress["step"]), shardings.step), params, opt_state)
    train_batches.restore(progress["data"])
  elif t.init_from:  # fine-tuning: the source's weights, a fresh optimizer, step 0
    params = checkpoint.restore_params(t.init_from, source_step, abstract_state.params)
    state = jax.jit(lambda params: TrainState(jnp.int32(0), params, tx.init(params)),
                    out_shardings=shardings, donate_argnums=0)(params)
  else:
    def init(rng):
      params = nn.meta.unbox(model_lib.init_params(cfg.model, rng))
      return TrainState(jnp.int32(0), params, tx.init(params))

    state = jax.jit(init, out_shardings=shardings)(jax.random.key(t.seed))

  # Compiled ahead of time, under the mesh so that the model's activation constraints bind.
  def batch_spec(accum):
    return jax.ShapeDtypeStruct((accum, t.batch_size, cfg.model.block_size), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))

  with jax.set_mesh(mesh):
    train_step = jax.jit(
        make_train_step(model, tx, schedule, t.seed),
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
    ).lower(abstract_state, batch_spec(t.grad_accum_steps), batch_spec(t.grad_accum_steps)).compile()
    eval_step = jax.jit(
        make_eval_step(model),
        in_shardings=(shardings.params, sharding.batch_sharding(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    ).lower(abstract_state.params, batch_spec(1), batch_spec(1)).compile()

  def estimate_loss(split_tokens, seed) -> float:
    batches = data.TokenBatches(split_tokens, seed=seed, **batch_args)
    losses = [eval_step(state.params, *(sharding.put_batch(a, mesh) for a in batches.batch(i)))
              for i in range(t.eval_iters)]
    return float(np.mean(jax.device_get(losses)))

  n_params = model_lib.count_params(abstract.params)
  tokens_per_step = t.batch_size * t.grad_accum_steps * cfg.model.block_size
  peak = peak_flops_per_device(t) * jax.device_count()
  flops_per_step = flops_per_token(cfg.model, model_lib.count_params(abstract.params, exclude_positions=True)) * tokens_per_step

  def evaluate_both(step) -> dict:
    return {"step": step, "train_loss": estimate_loss(train_tokens, t.seed + 1),
            "val_loss": estimate_loss(val_tokens, t.seed + 2)}

  start_step = int(state.step)
  show_bar = progress_bar and jax.process_index() == 0
  bar = tqdm(total=t.max_iters, initial=start_step, unit="step", dynamic_ncols=True,
             disable=None if show_bar else True)  # None: only on a terminal

  def log(message: str):
    if jax.process_index() == 0:
      tqdm.write(message)  # above the progress bar, if there is one

  log(f"gptjax: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, {jax.device_count()} "
      f"{jax.devices()[0].platform} devices, {tokens_per_step} tokens/step, "
      f"{'resuming at' if resume else 'starting at'} step {start_step} of {t.max_iters}"
      f"{f', fine-tuning {t.init_from}' if t.init_from else ''}")
  log(memory_report(abstract, shardings, train_step))

  result = evaluate_both(start_step) if start_step >= t.max_iters else {}  # already done: report it
  last_time, last_step = time.perf_counter(), start_step
  for step in range(start_step, t.max_iters):
    inputs, targets = next(train_batches)
    state, metrics = train_step(state, sharding.put_batch(inputs, mesh), sharding.put_batch(targets, mesh))
    done = step + 1
    bar.update(1)

    if done % t.log_interval == 0 or done == t.max_iters:
      metrics = jax.device_get(metrics)  # waits for the step: the timing below is honest
      now = time.perf_counter()
      steps_per_s = (done - last_step) / (now - last_time)
      mfu = f"{100 * flops_per_step * steps_per_s / peak:.1f}%" if peak else "n/a"
      log(f"step {done}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.2e}, grad norm "
          f"{metrics['grad_norm']:.3f}, {tokens_per_step * steps_per_s:,.0f} tokens/s, MFU {mfu}")
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      last_time, last_step = now, done
      if not np.isfinite(metrics["loss"]):
        raise UserError(f"loss became {metrics['loss']} at step {done}; lower optim.learning_rate")

    save_now = done % t.checkpoint_interval == 0 or done == t.max_iters
    if save_now or done % t.eval_interval == 0:
      result = evaluate_both(done)
      log(f"step {done}: train loss {result['train_loss']:.4f}, val loss {result['val_loss']:.4f}")
      if save_now:
        checkpoint.save(manager, done, params=state.params, opt_state=state.opt_state,
                        progress={"step": done, "data": train_batches.state()}, config=cfg,
                        tokenizer=meta["tokenizer"], val_loss=result["val_loss"])
      last_time, last_step = time.perf_counter(), done  # evaluating and saving are not training throughput
  manager.wait_until_finished()
  manager.close()
  bar.close()
  return result, state


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a named config (configs/NAME.yaml) or a YAML file")
  parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.max_iters=100")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
  args = parser.parse_intermixed_args(argv)  # flags may come between the overrides
  cfg = config_lib.load_config(args.config, args.overrides)
  result, _ = train(cfg, resume=args.resume, progress_bar=not args.no_progress)
  if jax.process_index() == 0:
    print(f"done: step {result['step']}, train loss {result['train_loss']:.4f}, val loss {result['val_loss']:.4f}")
