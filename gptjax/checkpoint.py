"""Orbax checkpoints: OUT_DIR/checkpoints/<step>/{params, opt_state, progress, config, tokenizer,
checksums, format}.

The latest `keep` checkpoints are kept for resuming, plus the one with the lowest validation
loss. A save that cannot wait for an evaluation (a preemption's, a timed one) is written unranked,
without a validation loss: never the best, kept while it is among the latest, and ranked (`rank`)
once a run that resumes from it has evaluated it. Parameters and optimizer state are separate
items so that sampling and evaluation read only the parameters. Arrays restore onto whatever
shardings the caller asks for, so a checkpoint saved on one mesh loads on another. A weights-only
checkpoint (`save_weights`: step 0 with params, config and tokenizer, as `gptjax convert import`
writes) can be sampled, evaluated and fine-tuned from, but not resumed. Every checkpoint records its layout version (`format`); one of another layout is
refused with a line that says how to carry it over, never read as something it is not.

Writing and reading fail safely. Before a run, the directory is checked for writes and room; a save
that fails stops the run in one line (`failed_saves_stop`). Every load is checked against the
checksums saved with the arrays; a damaged step is passed over for the newest intact one with a
warning (`first_intact`), and `--resume` moves it to OUT_DIR/damaged so new saves are not skipped.
"""

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import time
import uuid

from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from gptjax import checksum
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import SaveFailed
from gptjax.errors import UserError
from gptjax.errors import warn

T = TypeVar("T")

# 1: per-layer blocks h_0 .. h_N (gptjax 0.1, Flax Linen; no `format` item). 2: stacked blocks h/...
FORMAT_VERSION = 2


def _val_loss(metrics: dict) -> float:
  return metrics["val_loss"]


def checkpoint_dir(out_dir: str) -> pathlib.Path:
  return pathlib.Path(out_dir).absolute() / "checkpoints"


def create_dir(out_dir: str, checkpoint_bytes: int) -> None:
  """Before step 0: OUT_DIR/checkpoints is created (if the file system has room for a checkpoint of
  `checkpoint_bytes`) and takes a written, synced file."""
  directory = checkpoint_dir(out_dir)
  existing = next(p for p in (directory, *directory.parents) if p.exists())
  usage = shutil.disk_usage(existing) if existing.is_dir() else None
  if usage and usage.total and usage.free < checkpoint_bytes:  # total 0: /proc and the like, refused below
    raise UserError(f"{existing} has {usage.free / 2**20:,.1f} MiB free, a checkpoint of this run needs about "
                    f"{checkpoint_bytes / 2**20:,.1f} MiB: free some space or choose another train.out_dir")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {directory}: {e.strerror}") from None
  probe = directory / f".gptjax-probe-{uuid.uuid4().hex}"  # every process of every host its own: pids repeat in containers
  try:
    with open(probe, "wb") as f:
      f.write(bytes(4096))
      f.flush()
      os.fsync(f.fileno())
    probe.unlink()
  except OSError as e:
    raise UserError(f"cannot write checkpoints in {directory}: {e.strerror or e}") from None


def _reason(e: BaseException) -> str:
  """What went wrong, in a few words: the operating system's message where there is one, else the
  first line of the innermost cause (TensorStore's, under Orbax's)."""
  chain = [e]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for cause in chain:
    if isinstance(cause, OSError) and cause.strerror:
      return cause.strerror
    code = re.search(r"os_error_code='?(\d+)", str(cause))  # TensorStore's way of saying it
    if code:
      return os.strerror(int(code.group(1)))
  first_line = (str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__])[0]
  first_line = re.sub(r'^[A-Z_]+: | in OCDBT database at local file "[^"]*"', "", first_line)  # the step is named
  return first_line if len(first_line) < 300 else first_line[:300] + "..."


@contextlib.contextmanager
def failed_saves_stop(manager: ocp.CheckpointManager, step: int | None):
  """Turns a failed save (of `step`, or one in the background) into a one-line UserError. Orbax
  writes a step into a temporary folder and renames it only when complete, so the checkpoints
  before it stay whole and a half-written one is never taken as the latest."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # Orbax and TensorStore raise many types for one failed write
    raise SaveFailed(f"saving the checkpoint of step {step} in {manager.directory} failed ({_reason(e)}); "
                    "the run stopped, the checkpoints before it are intact (--resume continues from them)") from None


def open_manager(out_dir: str, *, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      # Unranked saves (no metrics) are neither the best nor kept for being unranked: LatestN keeps them.
      checkpoint_managers.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      create=create, preservation_policy=policy, best_fn=_val_loss, best_mode="min")
  return ocp.CheckpointManager(checkpoint_dir(out_dir), options=options)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every value in `tree` is finite: one compiled program for the whole tree."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def save(manager: ocp.CheckpointManager, step: int, *, params, opt_state, progress: dict,
         config: config_lib.Config, tokenizer: dict, val_loss: float | None) -> None:
  """Saves asynchronously; `manager.wait_until_finished()` before relying on the files. Refuses
  non-finite parameters; a non-finite validation loss is recorded as +inf, so it is never the best.
  `val_loss` None: unranked (not evaluated yet)."""
  if not _all_finite(params):
    raise UserError(f"the parameters at step {step} are not finite; not saving them over the checkpoints in "
                    f"{manager.directory}: lower optim.learning_rate")
  metrics = None if val_loss is None else {"val_loss": _rankable(val_loss)}
  manager.save(step, metrics=metrics, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      progress=ocp.args.JsonSave(progress),
      config=ocp.args.JsonSave(config_lib.to_dict(config)),
      tokenizer=ocp.args.JsonSave(tokenizer),
      checksums=ocp.args.JsonSave({"algorithm": checksum.ALGORITHM, "params": checksum.checksums(params),
                                   "opt_state": checksum.checksums(opt_state)}),
      format=ocp.args.JsonSave({"version": FORMAT_VERSION})))


def _rankable(val_loss: float) -> float:
  return float(val_loss) if math.isfinite(val_loss) else math.inf


def unranked(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` was saved without a validation loss (and is not a weights-only checkpoint)."""
  return has_train_state(manager, step) and manager.metrics(step) is None


def rank(manager: ocp.CheckpointManager, step: int, val_loss: float) -> None:
  """Records the validation loss of `step`, saved unranked, so that it competes for best. Written
  where the manager keeps each step's metrics (`STEP/metrics/metrics`, JSON), whole or not at all."""
  if jax.process_index() == 0:
    item = pathlib.Path(manager.directory) / str(step) / ocp.checkpoint_manager.METRIC_ITEM_NAME
    item.mkdir(exist_ok=True)
    tmp = item / f".{ocp.checkpoint_manager.METRIC_ITEM_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"val_loss": _rankable(val_loss)}))
    os.replace(tmp, item / ocp.checkpoint_manager.METRIC_ITEM_NAME)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"gptjax: step {step} ranked")
  manager.reload()


def save_weights(out_dir: str, params, *, config: config_lib.Config, tokenizer: dict) -> None:
  """Writes a weights-only checkpoint at step 0 of a new run directory."""
  manager = open_manager(out_dir)
  if manager.latest_step() is not None:
    raise UserError(f"{out_dir} already holds checkpoints; choose a new directory")
  manager.save(0, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      config=ocp.args.JsonSave(config_lib.to_dict(config)),
      tokenizer=ocp.args.JsonSave(tokenizer),
      checksums=ocp.args.JsonSave({"algorithm": checksum.ALGORITHM, "params": checksum.checksums(params)}),
      format=ocp.args.JsonSave({"version": FORMAT_VERSION})))
  manager.wait_until_finished()
  manager.close()


def has_train_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` holds optimizer state and data position (not a weights-only checkpoint)."""
  step_dir = pathlib.Path(manager.directory) / str(step)  # one folder per item inside
  return (step_dir / "opt_state").is_dir() and (step_dir / "progress").is_dir()


class Damaged(UserError):
  """A checkpoint whose files are missing, unreadable, or not what was saved."""


def _verified(manager: ocp.CheckpointManager, step: int, **items):
  """`items` of `step` restored (the arrays placed as their targets' shardings say) and checked
  against the checksums saved with them; raises Damaged, naming the step and what is wrong."""
  arrays = [name for name, arg in items.items() if isinstance(arg, ocp.args.StandardRestore)]
  # Checkpoints written before checksums have none; JSON items are not checksummed.
  verify = bool(arrays) and (pathlib.Path(manager.directory) / str(step) / "checksums").is_dir()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        **items, **({"checksums": ocp.args.JsonRestore()} if verify else {})))
  except Exception as e:  # Orbax and TensorStore raise many types for a missing or damaged file
    raise Damaged(f"checkpoint step {step} in {manager.directory} is damaged ({_reason(e)})") from None
  for name in arrays:
    if verify and restored.checksums.get("algorithm") == checksum.ALGORITHM and name in restored.checksums:
      bad = checksum.first_mismatch(restored[name], restored.checksums[name])
      if bad is not None:
        raise Damaged(f"checkpoint step {step} in {manager.directory} is damaged ({name}{bad} is not what was saved)")
  return restored


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
  """(params, opt_state, progress) of `step`, placed as the abstract trees' shardings say, verified."""
  restored = _verified(manager, step, params=ocp.args.StandardRestore(abstract_params),
                       opt_state=ocp.args.StandardRestore(abstract_opt_state), progress=ocp.args.JsonRestore())
  return restored.params, restored.opt_state, restored.progress


def first_intact(manager: ocp.CheckpointManager, out_dir: str, which: str, load: Callable[[int], T], *,
                 quiet: bool = False) -> tuple[int, T]:
  """(step, `load(step)`) of the checkpoint `which`. If it is damaged, and `which` is not a step
  number, a warning names it (unless `quiet`) and the newest intact other step is loaded instead;
  none intact: one line."""
  first = select_step(manager, out_dir, which)
  others = [] if which.isdigit() else sorted(set(manager.all_steps()) - {first}, reverse=True)
  damaged = []
  for step in [first, *others]:
    try:
      result = load(step)
    except Damaged as e:
      damaged.append(e)
      continue
    for e in damaged if not quiet else ():
      warn(f"{e}; using step {step}")
    return step, result
  if len(damaged) == 1:
    raise damaged[0]
  raise Damaged(f"no intact checkpoint in {out_dir}: {'; '.join(str(e) for e in damaged)}")


def select_step(manager: ocp.CheckpointManager, out_dir: str, which: str) -> int:
  """`which` is "best", "latest" or a step number."""
  steps = manager.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {out_dir}")
  if which == "best":  # weights-only checkpoints have no validation loss: then the latest
    best = manager.best_step()
    return manager.latest_step() if best is None else best
  if which == "latest":
    return manager.latest_step()
  if not which.isdigit() or int(which) not in steps:
    raise UserError(f"no checkpoint {which!r} in {out_dir}; saved steps: {sorted(steps)}")
  return int(which)


def set_aside(manager: ocp.CheckpointManager, out_dir: str, steps: list[int]) -> None:
  """Moves damaged `steps` out of the way of new saves, to OUT_DIR/damaged/STEP (kept, not deleted)."""
  if jax.process_index() == 0:
    for step in steps:
      target = pathlib.Path(out_dir).absolute() / "damaged" / str(step)
      target.parent.mkdir(exist_ok=True)
      shutil.move(pathlib.Path(manager.directory) / str(step), target.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                  if target.exists() else target)
      warn(f"moved the damaged checkpoint step {step} to {target.parent}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("gptjax: damaged checkpoints set aside")
  manager.reload()


def check_format(manager: ocp.CheckpointManager, step: int) -> None:
  """Refuses a checkpoint written in another layout than this gptjax reads."""
  step_dir = pathlib.Path(manager.directory) / str(step)
  version = 1
  if (step_dir / "format").is_dir():
    version = _verified(manager, step, format=ocp.args.JsonRestore()).format.get("version")
  if version != FORMAT_VERSION:
    raise UserError(
        f"{step_dir} is a checkpoint of layout {version}, this gptjax reads layout {FORMAT_VERSION}"
        f"{' (per-layer h_0..h_N blocks, before the stacked layers)' if version == 1 else ''}: export it with the "
        "gptjax that wrote it (`gptjax convert export RUN_DIR HF_DIR`), then `gptjax convert import HF_DIR NEW_DIR` here")


def read_config(manager: ocp.CheckpointManager, step: int) -> tuple[config_lib.Config, dict]:
  """The run's config and tokenizer description saved with `step`, after checking its layout."""
  check_format(manager, step)
  restored = _verified(manager, step, config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore())
  return config_lib.from_dict(restored.config), restored.tokenizer


def _open_existing(out_dir: str) -> ocp.CheckpointManager:
  if not checkpoint_dir(out_dir).is_dir():
    raise UserError(f"no checkpoint in {out_dir}: expected {checkpoint_dir(out_dir)}")
  return open_manager(out_dir, create=False)


def read_run_config(out_dir: str, which: str = "best") -> tuple[config_lib.Config, dict, int]:
  """(config, tokenizer meta, step) of the checkpoint `which` in a run directory."""
  manager = _open_existing(out_dir)
  step = select_step(manager, out_dir, which)
  cfg, tokenizer = read_config(manager, step)
  manager.close()
  return cfg, tokenizer, step


def params_target(cfg: config_lib.ModelConfig, mesh: jax.sharding.Mesh):
  """The parameters' ShapeDtypeStructs placed on `mesh` by the rules: what a restore fills."""
  shapes, names = model_lib.abstract_params(cfg)
  return abstract_like(shapes, sharding.param_shardings(shapes, names, mesh))


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params):
  """The parameters of `step`, placed as the ShapeDtypeStructs' shardings say, verified."""
  return _verified(manager, step, params=ocp.args.StandardRestore(abstract_params)).params


def load_for_inference(out_dir: str, which: str = "best", mesh: jax.sharding.Mesh | None = None):
  """(config, tokenizer meta, params, step) of a run's checkpoint `which` (or, if it is damaged,
  of the newest intact one), the parameters placed on `mesh` by the rules (default: the first device)."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
  manager = _open_existing(out_dir)

  def load(step: int):
    cfg, tokenizer = read_config(manager, step)
    return cfg, tokenizer, restore_params(manager, step, params_target(cfg.model, mesh))

  step, (cfg, tokenizer, params) = first_intact(manager, out_dir, which, load)
  manager.close()
  return cfg, tokenizer, params, step


def add_inference_arguments(parser, mesh: bool = True) -> None:
  """--checkpoint and --step, and (`mesh`) the mesh.* overrides, as the commands that read a run's
  checkpoint take them (`load_model`)."""
  parser.add_argument("--checkpoint", required=True, help="a run's out_dir")
  parser.add_argument("--step", default="best", help="best (lowest val loss), latest, or a step number")
  if mesh:
    parser.add_argument("mesh", nargs="*", help="mesh.data=N, mesh.fsdp=N, mesh.expert=N, mesh.tensor=N "
                        "(default: data parallel)")


def load_model(out_dir: str, which: str = "best", mesh_overrides: list[str] | None = None):
  """(config, tokenizer, params, step, mesh) of a run's checkpoint `which` (`load_for_inference`):
  the parameters on the mesh that `mesh_overrides` describe over this process's devices, or on
  the first device without them (None)."""
  mesh = None if mesh_overrides is None else sharding.inference_mesh(mesh_overrides)
  cfg, tokenizer_meta, params, step = load_for_inference(out_dir, which, mesh)
  return cfg, tokenizer_lib.from_meta(tokenizer_meta), params, step, mesh


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target for Orbax)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
