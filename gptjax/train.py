"""Training: build the state (fresh, resumed or fine-tuned), compile the steps, run the loop with
its periodic hooks (log, evaluate, checkpoint).

    gptjax train shakespeare_char_cpu                    # a named config (configs/*.yaml)
    gptjax train shakespeare_char_cpu train.max_iters=500 model.dropout=0.1
    gptjax train shakespeare_char_cpu --resume           # continue from the latest checkpoint
"""

import argparse
import dataclasses
import shlex

import jax
import numpy as np
from tqdm import tqdm

from gptjax import checkpoint
from gptjax import compile_cache
from gptjax import config as config_lib
from gptjax import data
from gptjax import harness
from gptjax import hooks
from gptjax import lock
from gptjax import metrics
from gptjax import model as model_lib
from gptjax import optim
from gptjax import profile
from gptjax import record
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.model import kernels
from gptjax.model import layers
from gptjax.model import moe
from gptjax.steps import TrainState

EXECUTION_FIELDS = ("dropout", "dtype", "remat", "scan_layers", "attention", "loss_chunk")  # how a run computes, not what it learns


def _with_architecture(cfg: config_lib.Config, model: config_lib.ModelConfig, source: str) -> config_lib.Config:
  """`cfg` with `model`'s architecture (from `source`). Its execution fields (EXECUTION_FIELDS) and
  its context (model.block_size, at most the model's positions) stay `cfg`'s."""
  if cfg.model.block_size > model.position_limit:
    raise UserError(f"model.block_size={cfg.model.block_size} is longer than the {model.position_limit} positions "
                    f"{source} takes: set model.block_size to at most {model.position_limit}")
  kept = {name: getattr(cfg.model, name) for name in (*EXECUTION_FIELDS, "block_size")}
  return dataclasses.replace(cfg, model=dataclasses.replace(model, max_positions=model.position_limit, **kept))


def _how_computed_aside(model: config_lib.ModelConfig) -> config_lib.ModelConfig:
  """What a resumed run must keep: remat, scanning, the attention kernel and the loss's chunks may
  change, they compute the same values."""
  return dataclasses.replace(model, remat="none", scan_layers="auto", attention="auto", loss_chunk=0)


def _describe(tokenizer_meta: dict) -> str:
  return f"{tokenizer_meta['kind']}, {len(tokenizer_meta['chars'])} characters" \
      if tokenizer_meta["kind"] == "char" else tokenizer_meta["kind"]


def _checkpoint_bytes(model: config_lib.ModelConfig, tx) -> int:
  """The size of a checkpoint's parameters and optimizer state, from their shapes alone."""
  shapes, _ = model_lib.abstract_params(model)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((shapes, jax.eval_shape(tx.init, shapes))))


def resolve_run(cfg: config_lib.Config, manager, resume: bool, meta: dict) -> tuple[config_lib.Config, int | None, int | None]:
  """Checks what `cfg` asks against what `out_dir` holds; returns (the run's config, the step to
  resume, the step of train.init_from to fine-tune from)."""
  t = cfg.train
  latest = manager.latest_step()
  if latest is not None and not resume:
    raise UserError(f"{t.out_dir} already holds checkpoints (latest step {latest}): pass --resume "
                    "to continue it, or set train.out_dir to a new directory")
  if resume and latest is None:
    raise UserError(f"--resume: no checkpoint in {t.out_dir}")
  if resume:
    if not checkpoint.has_train_state(manager, latest):
      raise UserError(f"{t.out_dir} holds model weights only (no optimizer state), as an import does: "
                      f"fine-tune from it with train.init_from={t.out_dir} and a new train.out_dir")
    # Every step of a run has its model config; `initial_state` names any damaged step it passes over.
    _, (saved_cfg, _) = checkpoint.first_intact(
        manager, t.out_dir, "latest", lambda step: checkpoint.read_config(manager, step), quiet=True)
    if t.init_from:  # a fine-tuning run's architecture is the one it started from
      cfg = _with_architecture(cfg, saved_cfg.model, t.init_from)
    if saved_cfg.optim.name != cfg.optim.name:
      raise UserError(f"{t.out_dir} was trained with optim.name={saved_cfg.optim.name}, not {cfg.optim.name}: its "
                      f"optimizer state is {saved_cfg.optim.name}'s; resume with optim.name={saved_cfg.optim.name}, "
                      f"or fine-tune with train.init_from={t.out_dir} and a new train.out_dir")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, order=saved_cfg.data.order,
                                                            align=saved_cfg.data.align))  # the same stream
    if _how_computed_aside(saved_cfg.model) != _how_computed_aside(cfg.model):
      raise UserError(f"the model config differs from the checkpoint's in {t.out_dir}; saved: {saved_cfg.model}")
    return cfg, latest, None
  if t.init_from:
    source_cfg, source_tokenizer, source_step = checkpoint.read_run_config(t.init_from)
    if source_tokenizer != meta["tokenizer"]:
      raise UserError(f"{cfg.data.mixture or cfg.data.dir} was prepared with another tokenizer ({_describe(meta['tokenizer'])}) "
                      f"than {t.init_from} uses ({_describe(source_tokenizer)})")
    return _with_architecture(cfg, source_cfg.model, t.init_from), None, source_step
  return cfg, None, None


def initial_state(cfg: config_lib.Config, steps: steps_lib.Steps, tx, manager, resume_step: int | None,
                  source_step: int | None, train_batches: data.TokenBatches) -> TrainState:
  """The state to start from, placed as `steps` expects: resumed (with the data position),
  fine-tuned from train.init_from's weights with a fresh optimizer, or freshly initialised."""
  if resume_step is not None:
    def load(step: int):
      checkpoint.read_config(manager, step)
      return checkpoint.restore_train_state(manager, step, steps.abstract.params, steps.abstract.opt_state)

    intact, (params, opt_state, progress) = checkpoint.first_intact(manager, cfg.train.out_dir, "latest", load)
    checkpoint.set_aside(manager, cfg.train.out_dir, [s for s in manager.all_steps() if s > intact])
    train_batches.restore(progress["data"], data_dir=cfg.data.mixture or cfg.data.dir,
                          allow_change=cfg.data.allow_data_change)
    return TrainState(jax.device_put(np.int32(progress["step"]), steps.shardings.step), params, opt_state)
  if source_step is not None:
    source = checkpoint.open_manager(cfg.train.init_from, create=False)
    params = checkpoint.restore_params(source, source_step, steps.abstract.params)
    source.close()
    return steps_lib.start_from(params, tx, steps.shardings)
  return steps_lib.init_state(cfg.model, tx, steps.shardings, cfg.train.seed)


def _loss_estimator(steps: steps_lib.Steps, prepared: data.Prepared, batch_args: dict, mesh, t: config_lib.TrainConfig):
  """params -> {"train_loss", "val_loss", "NAME/loss" for each further validation set}: the mean
  loss of `t.eval_iters` fixed batches (random windows) of each."""
  sets = {"train_loss": prepared.splits["train"], "val_loss": prepared.splits["val"],
          **{f"{name}/loss": tokens for name, tokens in prepared.eval_sets.items()}}

  def estimate(params) -> dict:
    losses = {}
    for n, (key, tokens) in enumerate(sets.items()):
      batches = data.TokenBatches(tokens, seed=t.seed + 1 + n, **batch_args)  # one array: the weights are unused
      losses[key] = float(np.mean(jax.device_get(
          [steps.eval(params, *(sharding.put_batch(a, mesh) for a in batches.batch(i))) for i in range(t.eval_iters)])))
    return losses
  return estimate


def _start_line(cfg: config_lib.Config, steps: steps_lib.Steps, mesh, start_step: int, resume: bool) -> str:
  t = cfg.train
  micro, accum = t.micro_batches(sharding.batch_shards(mesh))
  total, active = model_lib.count_params(steps.abstract.params), model_lib.active_params(cfg.model)
  active = f" ({active / 1e6:.2f}M active per token)" if active < total else ""
  return (f"gptjax: {total / 1e6:.2f}M parameters{active}, mesh {dict(mesh.shape)}, "
          f"{mesh.devices.size} {jax.devices()[0].platform} devices, "
          f"{cfg.tokens_per_step} tokens/step ({t.batch_size} x {cfg.model.block_size}: {accum} micro-step"
          f"{'s' if accum > 1 else ''} of {micro // sharding.batch_shards(mesh)} per device), "
          f"{'resuming at' if resume else 'starting at'} step {start_step} of {t.max_iters}"
          f"{f', fine-tuning {t.init_from}' if t.init_from else ''}")


def _documents_line(cfg: config_lib.DataConfig, tok, start: int | None) -> str:
  if start is None:
    why = "data.document_mask=false" if str(cfg.document_mask).lower() == "false" else "the tokenizer marks none"
    return f"documents: not masked ({why}): windows attend across document boundaries"
  positions = ", positions counted from each document's start" if cfg.document_positions else ""
  return f"documents: masked, each opened by token {start} ({tok.decode([start])!r}){positions}"


def _order_line(batches: data.TokenBatches, max_iters: int) -> str:
  aligned = "" if batches.align_to is None else f", each moved to the first document start in its block (data.align=document)"
  if batches.order == "random":
    return f"data: windows drawn at random places, with replacement (data.order=random){aligned}"
  return (f"data: shuffled epochs of {batches.windows_per_epoch:,} windows; {max_iters} steps are "
          f"{batches.epoch(max_iters):.2f} epochs (data.order=shuffled){aligned}")


def train(cfg: config_lib.Config, *, resume: bool = False, progress_bar: bool = True,
          devices=None, resume_hint: str = "the same command with --resume") -> tuple[dict, TrainState]:
  """Trains as `cfg` says; returns the final {"step", "train_loss", "val_loss"} and TrainState,
  or {"step", "stopped"} when a signal stopped it (after saving that step).

  `devices` (default: all) are the devices the mesh is built from.
  """
  sharding.initialize_distributed(cfg.distributed)
  prepared = data.load_prepared(cfg.data)
  meta = prepared.meta
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
  t = cfg.train
  mesh = sharding.make_mesh(cfg.mesh, devices)
  micro_batch, accum_steps = t.micro_batches(sharding.batch_shards(mesh))
  manager = checkpoint.open_manager(t.out_dir, keep=t.keep_checkpoints, create=False)
  cfg, resume_step, source_step = resolve_run(cfg, manager, resume, meta)
  attention = kernels.report(cfg.model, cfg.model.block_size)  # an explicit kernel that cannot run stops here
  batch_args = dict(batch_size=micro_batch, block_size=cfg.model.block_size, weights=prepared.weights,
                    vocab_size=meta["vocab_size"],
                    process_index=jax.process_index(), process_count=jax.process_count())
  splits = prepared.splits
  tok = tokenizer_lib.from_meta(meta["tokenizer"])
  train_batches = data.TokenBatches(splits["train"], accum_steps=accum_steps, seed=t.seed, order=cfg.data.window_order,
                                    align_to=data.align_token(cfg.data, tok), fingerprint=prepared.fingerprint,
                                    name="train", **batch_args)
  data.TokenBatches(splits["val"], name="val", **batch_args)  # checks the split is long enough
  for name, tokens in prepared.eval_sets.items():
    data.TokenBatches(tokens, name=f"{name} validation", **batch_args)
  train_batches.batch(0)  # drawn (and its token ids checked) before anything is written
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
  document_start = data.document_start(cfg.data, tok)
  sample_prompt = hooks.sample_prompt_ids(tok, t.sample_prompt)  # checked before anything is written
  if t.eval_tasks:
    if jax.process_count() > 1:
      raise UserError("train.eval_tasks runs in single-process runs only; evaluate a checkpoint with gptjax eval")
    harness.check_tasks(t.eval_tasks.split(","))
  checkpoint.create_dir(t.out_dir, _checkpoint_bytes(cfg.model, tx))  # once the run is known sound: bad input writes nothing

  with lock.RunLock(t.out_dir, hold=jax.process_index() == 0):  # process 0 holds it for a multi-host run
    steps = steps_lib.compile_steps(cfg, tx, schedule, mesh, document_start)
    state = initial_state(cfg, steps, tx, manager, resume_step, source_step, train_batches)
    start_step = int(state.step)
    log = tqdm.write if jax.process_index() == 0 else (lambda message: None)  # above the progress bar
    bar = tqdm(total=t.max_iters, initial=start_step, unit="step", dynamic_ncols=True,
               disable=None if progress_bar and jax.process_index() == 0 else True)  # None: only on a terminal
    log(_start_line(cfg, steps, mesh, start_step, resume))
    log(attention)
    log(_documents_line(cfg.data, tok, document_start))
    log(_order_line(train_batches, t.max_iters))
    log(layers.scan_report(cfg.model))
    if cfg.model.n_experts:
      log(moe.report(cfg.model, mesh))
    log(compile_cache.report())
    for line in sharding.unsplit_report(*model_lib.abstract_params(cfg.model), mesh):
      log(line)
    if (no_peak := metrics.peak_report(t)) is not None:
      log(no_peak)
    log(metrics.memory_report(steps.abstract, steps.shardings, steps.train))
    log(metrics.kv_cache_report(cfg.model))

    throughput = metrics.Throughput(cfg, start_step)
    run_record = record.Record(cfg, start_step, resume) if jax.process_index() == 0 else None
    if run_record is not None and start_step < t.max_iters:
      sizes = metrics.memory_per_device(steps.abstract, steps.shardings, steps.train)
      run_record.write("memory", start_step, {f"{name.replace(' ', '_')}_mib": size / 2**20 for name, size in sizes.items()})
    evaluation = hooks.Evaluate(_loss_estimator(steps, prepared, batch_args, mesh, t), log, throughput, run_record)
    save = hooks.SaveCheckpoint(manager, evaluation, train_batches, cfg, meta["tokenizer"], throughput)
    on_signal = hooks.SaveOnSignal(save, resume_hint)
    profiler = profile.Profile(t.out_dir, *(t.profile_steps or (-1, -1)), log, steps.train.as_text() if t.profile else "")
    sample_text = t.sample_tokens and run_record is not None and jax.process_count() == 1  # see SampleText
    loop_hooks = [
        hooks.Hook(hooks.LogMetrics(log, throughput, bar, t.max_bad_steps, run_record, cfg.model.layer_stacks()),
                   every=(t.log_interval,)),
        hooks.Hook(evaluation, every=(t.eval_interval,)),
        *([hooks.Hook(hooks.SampleText(cfg, tok, sample_prompt, mesh, run_record, throughput),
                      every=(t.eval_interval,))] if sample_text else []),
        *([hooks.Hook(hooks.EvalTasks(cfg, tok, mesh, log, run_record, throughput), every=(t.eval_interval,))]
          if t.eval_tasks else []),
        *([hooks.Hook(hooks.PlotLoss(run_record, t.out_dir), every=(t.eval_interval,))] if run_record else []),
        hooks.Hook(save, every=(t.checkpoint_interval,)),
        *([hooks.Hook(hooks.SaveEvery(save, t.checkpoint_minutes), every=(t.log_interval,))] if t.checkpoint_minutes else []),
        hooks.Hook(save.check, every=(1,)),
        *([hooks.Hook(profiler, every=(1,))] if t.profile else []),
        hooks.Hook(on_signal, every=(1,)),
    ]
    on_signal.install()
    try:
      if resume_step is not None:
        save.rank_resumed(start_step, state)  # a preemption's save is evaluated now that there is time
      if start_step >= t.max_iters and evaluation.latest.get("step") != start_step:  # already done: report it
        evaluation.report(start_step, state)
      profiler(start_step, state, {})  # train.profile=0:N starts before the first step
      for step in range(start_step, t.max_iters):
        inputs, targets = next(train_batches)
        state, step_metrics = steps.train(state, sharding.put_batch(inputs, mesh), sharding.put_batch(targets, mesh))
        bar.update(1)
        hooks.run(loop_hooks, step + 1, t.max_iters, state, step_metrics)
    except hooks.Preempted as stop:
      log(str(stop))
      return {"step": int(state.step), "stopped": str(stop)}, state
    finally:  # however the loop ends, a save under way completes
      on_signal.restore()
      profiler.close()
      bar.close()
      save.close()
      if run_record is not None:
        run_record.close()
  return evaluation.latest, state


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a named config (configs/NAME.yaml) or a YAML file")
  parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.max_iters=100")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
  args = parser.parse_intermixed_args(argv)  # flags may come between the overrides
  cfg = config_lib.load_config(args.config, args.overrides)
  hint = shlex.join(["gptjax", "train", args.config, *args.overrides, "--resume"])
  result, _ = train(cfg, resume=args.resume, progress_bar=not args.no_progress, resume_hint=hint)
  if jax.process_index() == 0 and "stopped" not in result:
    print(f"done: step {result['step']}, train loss {result['train_loss']:.4f}, val loss {result['val_loss']:.4f}")
