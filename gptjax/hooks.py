"""Periodic work hung on the training loop. A hook runs every N steps (for any of its intervals)
and at the last step; the loop calls `run` after each step, in the order the hooks are listed.

The standard hooks log the step's metrics (to the console and the run's record, `gptjax.record`),
evaluate both splits, sample and redraw loss.png at each evaluation, save checkpoints (by steps and
by time), and stop on a signal or a preemption notice; profiling (`gptjax.profile`) hangs on the
same way.
"""

import dataclasses
import os
import signal
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax import checkpoint
from gptjax import data
from gptjax import harness
from gptjax import metrics as metrics_lib
from gptjax import plots
from gptjax import record
from gptjax import sample
from gptjax import tokenizer as tokenizer_lib
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.steps import TrainState


@dataclasses.dataclass(frozen=True)
class Hook:
  fn: Callable[[int, TrainState, dict], None]  # (step done, state, the step's metrics on device)
  every: tuple[int, ...]

  def due(self, step: int, last_step: int) -> bool:
    return step == last_step or any(step % n == 0 for n in self.every)


def run(hooks: list[Hook], step: int, last_step: int, state: TrainState, step_metrics: dict) -> None:
  for hook in hooks:
    if hook.due(step, last_step):
      hook.fn(step, state, step_metrics)


OPTIONAL_LOSSES = {"z_loss": "z-loss", "router_balance": "router balance", "router_z": "router z"}  # as logged


class LogMetrics:
  """A line with loss (and z-loss, a mixture's router losses), learning rate, gradient norm, tokens/s, MFU and any skipped
  non-finite steps (waits for the step), and those values with the gradient and parameter norms
  per layer group and memory in use in the run's record; stops the run after `max_bad_steps`
  consecutive ones."""

  def __init__(self, log: Callable[[str], None], throughput: metrics_lib.Throughput, bar, max_bad_steps: int,
               run_record: record.Record | None, layer_stacks: tuple = ()):
    self.log, self.throughput, self.bar, self.max_bad_steps = log, throughput, bar, max_bad_steps
    self.record, self.layer_stacks = run_record, layer_stacks

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    values = jax.device_get(step_metrics)  # waits for the step: the timing below is honest
    tokens_per_s, mfu = self.throughput.measure(step)
    param_norms = metrics_lib.param_norms(state.params, self.layer_stacks)  # on every process: a program over the whole mesh
    skipped = f", skipped {values['skipped']} non-finite steps so far" if values["skipped"] else ""
    extra = [name for name in OPTIONAL_LOSSES if name in values]  # z-loss, a mixture's router losses
    losses = "".join(f", {OPTIONAL_LOSSES[name]} {values[name]:{'.2e' if name == 'z_loss' else '.3f'}}"
                     for name in extra)
    self.log(f"step {step}: loss {values['loss']:.4f}{losses}, lr {values['lr']:.2e}, grad norm "
             f"{values['grad_norm']:.3f}, {tokens_per_s:,.0f} tokens/s, MFU "
             f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}{skipped}")
    self.bar.set_postfix(loss=f"{values['loss']:.4f}")
    if self.record is not None:
      self.record.write("train", step, {
          "loss": float(values["loss"]), **{name: float(values[name]) for name in extra},
          "lr": float(values["lr"]), "grad_norm": float(values["grad_norm"]),
          "tokens_per_s": tokens_per_s, **({} if mfu is None else {"mfu": mfu}),
          "skipped_steps": int(values["skipped"])})
      norms = {"grad": values["grad_norms"], "param": jax.device_get(param_norms)}
      self.record.write("norms", step, {f"{kind}/{group}": float(norm) for kind in ("grad", "param")  # norms/grad/layer_03
                                        for group, norm in norms[kind].items()})
      self.record.write("memory", step, metrics_lib.memory_in_use())
    if values["bad_steps"] >= self.max_bad_steps:
      raise UserError(f"the loss or gradients were not finite for {values['bad_steps']} steps in a row, from step "
                      f"{step - values['bad_steps'] + 1} (train.max_bad_steps={self.max_bad_steps}); their updates "
                      "were skipped, so no checkpoint holds non-finite parameters: lower optim.learning_rate")


class Evaluate:
  """The mean loss of `eval_iters` fixed batches of each split and further validation set
  (data.eval_sets, a mixture's folders); `latest` keeps the last result."""

  def __init__(self, estimate: Callable[[dict], dict], log: Callable[[str], None],
               throughput: metrics_lib.Throughput, run_record: record.Record | None):
    self.estimate, self.log, self.throughput, self.record = estimate, log, throughput, run_record
    self.latest: dict = {}

  def __call__(self, step: int, state: TrainState, step_metrics: dict | None = None) -> None:
    self.report(step, state)
    if self.record is not None:  # eval/train_loss, eval/val_loss, eval/NAME/loss
      self.record.write("eval", step, {key: value for key, value in self.latest.items() if key != "step"})
    self.throughput.reset(step)

  def report(self, step: int, state: TrainState) -> None:
    """Evaluates and logs, without recording (a finished run's losses, recorded when it ran)."""
    self.latest = {"step": step, **self.estimate(state.params)}
    named = "".join(f", {key.removesuffix('/loss')} loss {value:.4f}" for key, value in self.latest.items()
                    if key.endswith("/loss"))
    self.log(f"step {step}: train loss {self.latest['train_loss']:.4f}, val loss {self.latest['val_loss']:.4f}{named}")

  def ranking_loss(self, best_of: str) -> float:
    """The latest loss that ranks checkpoints (train.best_of): val, or a named validation set's."""
    return self.latest["val_loss" if best_of == "val" else f"{best_of}/loss"]


def sample_prompt_ids(tok, prompt: str) -> list[int]:
  """train.sample_prompt's token ids; empty: end-of-text, or a character model's first character."""
  try:
    ids = tokenizer_lib.encode_sequence(tok, prompt)
  except UserError as e:
    raise UserError(f"train.sample_prompt={prompt!r}: {e}") from None
  return ids or [tok.eot_id if tok.eot_id is not None else 0]


class SampleText:
  """A sample from the model as it is, in the record: `train.sample_tokens` long (cut at
  end-of-text), at temperature 0.8, continuing `prompt_ids`. Single-process runs only: the sample
  is gathered on one host."""

  def __init__(self, cfg: Config, tok, prompt_ids: list[int], mesh, run_record: record.Record,
               throughput: metrics_lib.Throughput):
    self.cfg, self.tok, self.prompt_ids, self.mesh = cfg, tok, prompt_ids, mesh
    self.record, self.throughput = run_record, throughput

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    t = self.cfg.train
    tokens = sample.generate(self.cfg.model, state.params, np.asarray([self.prompt_ids], np.int32),
                             max_new_tokens=t.sample_tokens, temperature=0.8, rng=jax.random.key(t.seed + step),
                             eot_id=self.tok.eot_id, mesh=self.mesh)[0]
    self.record.text(step, "sample", sample.continuation(self.tok, t.sample_prompt, tokens))
    self.throughput.reset(step)


class EvalTasks:
  """The lm-evaluation-harness tasks of train.eval_tasks on the model as it is (`gptjax.harness`),
  their metrics logged and recorded beside the losses (metrics.jsonl rows of kind "tasks";
  TensorBoard and W&B tasks/TASK/METRIC). Single-process runs only."""

  def __init__(self, cfg: Config, tok, mesh, log: Callable[[str], None], run_record: record.Record | None,
               throughput: metrics_lib.Throughput):
    self.cfg, self.tok, self.mesh, self.log, self.record, self.throughput = cfg, tok, mesh, log, run_record, throughput
    self.tasks = cfg.train.eval_tasks.split(",")

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    lm = harness.make_lm(self.cfg, self.tok, state.params, self.mesh)
    values = harness.metrics(harness.evaluate_tasks(lm, self.tasks, limit=self.cfg.train.eval_tasks_limit or None))
    self.log(f"step {step}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
    if self.record is not None:
      self.record.write("tasks", step, values)
    self.throughput.reset(step)


class PlotLoss:
  """OUT_DIR/loss.png, redrawn from the record."""

  def __init__(self, run_record: record.Record, out_dir: str):
    self.record, self.path, self.title = run_record, os.path.join(out_dir, "loss.png"), f"loss of {out_dir}"

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    with record.stop_if_unwritable(self.path, step):
      plots.draw({self.title: self.record.rows}, self.path, self.title)


class SaveCheckpoint:
  """An asynchronous checkpoint with this step's validation loss (to keep the best: train.best_of's),
  evaluated first; `save_now` saves at once, without it. A save that fails, now or in the background, stops
  the run with one line (`check` each step)."""

  def __init__(self, manager, evaluation: Evaluate, batches: data.TokenBatches, cfg: Config,
               tokenizer: dict, throughput: metrics_lib.Throughput):
    self.manager, self.evaluation, self.batches = manager, evaluation, batches
    self.cfg, self.tokenizer, self.throughput = cfg, tokenizer, throughput
    self.saving: int | None = None  # the step of the latest save begun
    self.saved_at = time.monotonic()  # when it began (or training did)

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    if self.evaluation.latest.get("step") != step:  # the best checkpoint is chosen by this step's val loss
      self.evaluation(step, state)
    self.save_now(step, state)

  def rank_resumed(self, step: int, state: TrainState) -> None:
    """The step a run resumes from, if it was saved unranked: evaluated now, its loss recorded."""
    if checkpoint.unranked(self.manager, step):
      self.evaluation(step, state)
      checkpoint.rank(self.manager, step, self.evaluation.ranking_loss(self.cfg.train.best_of))

  def save_now(self, step: int, state: TrainState) -> None:
    """Saves without evaluating (a preemption gives seconds): with this step's validation loss if it
    has been evaluated, else unranked until a run resumes from it (`rank_resumed`)."""
    self.wait()  # Orbax would wait for the previous save too; this way its failure names its step
    self.saving, self.saved_at = step, time.monotonic()
    evaluated = self.evaluation.latest.get("step") == step
    with checkpoint.failed_saves_stop(self.manager, step):
      checkpoint.save(self.manager, step, params=state.params, opt_state=state.opt_state,
                      progress={"step": step, "data": self.batches.state()}, config=self.cfg,
                      tokenizer=self.tokenizer,
                      val_loss=self.evaluation.ranking_loss(self.cfg.train.best_of) if evaluated else None)
    self.throughput.reset(step)

  def check(self, *unused) -> None:
    """Raises (one line) if the latest save has failed in the background; never waits for one."""
    if self.saving is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Until the save under way is written (or has failed: one line)."""
    with checkpoint.failed_saves_stop(self.manager, self.saving):
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save under way, then closes the manager (where Orbax reports failures too)."""
    self.wait()
    with checkpoint.failed_saves_stop(self.manager, self.saving):
      self.manager.close()


class SaveEvery:
  """A checkpoint, unranked, once `minutes` have passed since the last save began: run it at log
  steps. In a multi-process run process 0's clock decides for all."""

  def __init__(self, save: SaveCheckpoint, minutes: float):
    self.save, self.seconds = save, minutes * 60

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    due = time.monotonic() - self.save.saved_at >= self.seconds
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    if due and self.save.saving != step:
      self.save.save_now(step, state)


class Preempted(Exception):
  """Training stopped early on request (a signal); the message says how to go on."""


class SaveOnSignal:
  """On SIGTERM (a preemption, `scancel`) or SIGINT (Ctrl-C), the step under way finishes, a
  checkpoint of it is saved at once (unranked: nothing is evaluated first) and waited for, and
  training stops; a second signal exits at once,
  leaving the checkpoints as they are. The handlers are in place between `install` and `restore`.

  In a multi-process run, JAX's preemption service (started by `jax.distributed.initialize`) takes
  SIGTERM on any process, tells the others, and has all of them agree on the step to save, which
  they learn by asking at every step. Ctrl-C is passed to it as a SIGTERM.
  """

  def __init__(self, save: SaveCheckpoint, resume_hint: str):
    self.save, self.resume_hint = save, resume_hint
    self.multiprocess = jax.process_count() > 1
    self.received: str | None = None
    self.previous = {}

  def install(self) -> None:
    ours = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
    self.previous = {s: signal.signal(s, self._on_signal) for s in ours}

  def restore(self) -> None:
    for s, handler in self.previous.items():
      signal.signal(s, handler)

  def _on_signal(self, signum, frame) -> None:
    if self.received is not None:
      os._exit(128 + signum)  # the second signal: now, without touching the checkpoints
    self.received = signal.Signals(signum).name
    if self.multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    if self.multiprocess:
      if not multihost_utils.reached_preemption_sync_point(step):
        return
      self.received = self.received or "a preemption notice"
    elif self.received is None:
      return
    if self.save.saving != step:
      self.save.save_now(step, state)
    self.save.wait()
    raise Preempted(f"stopped by {self.received} at step {step}, saved in {self.save.cfg.train.out_dir}; "
                    f"continue with: {self.resume_hint}")
