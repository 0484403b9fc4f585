"""`gptjax sweep`: trains a grid of overrides of one config, a run folder each, and compares them.

    gptjax sweep shakespeare_char_cpu --vary model.norm_position=pre,post --seeds 2
    gptjax sweep shakespeare_char_cpu --vary model.positions=learned,sinusoidal,rope,none --seeds 2 train.max_iters=600
    gptjax sweep shakespeare_char_cpu --vary model.n_layer=4,12 --vary optim.warmup_iters=0,100 --parallel 2

Every combination of the --vary values is a variant, trained once per seed (train.seed: the
config's, then +1, +2, ...), each by a `gptjax train` process of its own in OUT/VARIANT,seed=S (its
output in train.log there). Overrides after the config apply to every run. The sweep resumes: a
run whose last step has been evaluated is not trained again, one with a checkpoint continues from
it (`--resume`), and one stopped for non-finite losses is recorded as diverged and left so.
SIGTERM or Ctrl-C stops the runs under way at a saved step; the same command continues them.

Then, per variant: the last validation loss (mean and standard deviation over the seeds), the
median tokens/s, the mean number of steps the seeds took to reach a target validation loss
(--target-loss; by default the highest last loss of the runs that did not diverge, which every one
of them reached) and the runs that diverged, as OUT/sweep.md and OUT/sweep.csv (each run in
OUT/runs.csv), and every run's validation curve in OUT/sweep.png, a colour per variant.
"""

import argparse
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

from gptjax import checkpoint
from gptjax import config as config_lib
from gptjax import plots
from gptjax import record
from gptjax.errors import UserError

DIVERGED_FILE = "diverged.txt"  # in a run's folder: the error of a run stopped for non-finite losses
SET_BY_THE_SWEEP = ("train.out_dir", "train.seed")


@dataclasses.dataclass(frozen=True)
class Run:
  variant: tuple[tuple[str, str], ...]  # ((key, value), ...) in --vary's order
  seed: int
  out_dir: pathlib.Path
  max_iters: int

  @property
  def label(self) -> str:
    return variant_label(self.variant)

  def overrides(self) -> list[str]:
    return [*(f"{key}={value}" for key, value in self.variant), f"train.seed={self.seed}", f"train.out_dir={self.out_dir}"]


def variant_label(variant) -> str:
  return ", ".join(f"{key.split('.', 1)[1]}={value}" for key, value in variant) or "the config"


def parse_vary(specs: list[str]) -> list[tuple[str, list[str]]]:
  """--vary section.field=V1,V2,... -> [(key, values)], checked."""
  axes = []
  for spec in specs:
    key, _, values = spec.partition("=")
    if "." not in key or not values:
      raise UserError(f"--vary {spec!r} is not section.field=V1,V2,...")
    values = values.split(",")
    if "" in values or len(set(values)) != len(values):
      raise UserError(f"--vary {spec!r}: the values must be distinct and not empty")
    if key in SET_BY_THE_SWEEP:
      raise UserError(f"--vary {key}: the sweep sets it (a folder per run under --out; --seeds for seeds)")
    if key in dict(axes):
      raise UserError(f"--vary {key} is given twice")
    axes.append((key, values))
  return axes


def plan(config: str, overrides: list[str], axes, seeds: int, out: pathlib.Path) -> list[Run]:
  """Every (variant, seed) run, seed by seed; each run's config is checked here, before any trains."""
  for item in overrides:
    key = item.split("=")[0]
    if key == "train.out_dir":
      raise UserError("train.out_dir: the sweep puts each run in a folder of its own under --out")
    if key in dict(axes):
      raise UserError(f"{key} is both an override and varied (--vary)")
  base_seed = config_lib.load_config(config, overrides).train.seed
  runs = []
  for seed in range(base_seed, base_seed + seeds):
    for values in itertools.product(*(values for _, values in axes)):
      variant = tuple(zip((key for key, _ in axes), values))
      name = ",".join([*(f"{key}={value}" for key, value in variant), f"seed={seed}"]).replace("/", "_")
      run = Run(variant, seed, out / name, 0)
      cfg = config_lib.load_config(config, [*overrides, *run.overrides()])  # a bad value stops the sweep here
      runs.append(dataclasses.replace(run, max_iters=cfg.train.max_iters))
  return runs


def _rows(run: Run) -> list[dict]:
  return record.read_rows(str(run.out_dir)) if (run.out_dir / record.METRICS_FILE).is_file() else []


def status(run: Run) -> str:
  """finished (its last step evaluated), diverged, interrupted (a checkpoint to continue from) or new."""
  if (run.out_dir / DIVERGED_FILE).is_file():
    return "diverged"
  if any(row["kind"] == "eval" and row["step"] >= run.max_iters for row in _rows(run)):
    return "finished"
  if checkpoint.checkpoint_dir(str(run.out_dir)).is_dir():
    manager = checkpoint.open_manager(str(run.out_dir), create=False)
    latest = manager.latest_step()
    manager.close()
    return "new" if latest is None else "interrupted"
  return "new"


def _last_line(path: pathlib.Path) -> str:
  lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
  return lines[-1] if lines else "no output"


def _ended(run: Run, returncode: int, say) -> str | None:
  """Records how a run's process ended; returns its error if it failed other than by diverging."""
  if returncode == 0:
    say(f"{run.out_dir.name}: {'finished' if status(run) == 'finished' else 'stopped at a saved step'}")
    return None
  error = _last_line(run.out_dir / "train.log")
  train_rows = [row for row in _rows(run) if row["kind"] == "train"]
  if train_rows and (train_rows[-1].get("skipped_steps") or not math.isfinite(train_rows[-1]["loss"])):
    (run.out_dir / DIVERGED_FILE).write_text(error + "\n")
    say(f"{run.out_dir.name}: diverged ({error})")
    return None
  return f"{run.out_dir.name} failed: {error} (its output: {run.out_dir / 'train.log'})"


def train_runs(todo: list[Run], command, parallel: int, say) -> None:
  """Trains `todo`, `parallel` processes at a time. SIGTERM or Ctrl-C, or a run that fails, passes
  SIGTERM to those under way (each saves its step) and starts no more; once they have ended, a
  UserError says what happened."""
  running, stopped, failures = [], [], []

  def stop_all(signum=None, frame=None):
    if signum is not None:
      stopped.append(signal.Signals(signum).name)
    for process, _ in running:
      process.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, stop_all) for s in (signal.SIGTERM, signal.SIGINT)}
  queue = list(todo)
  try:
    while running or (queue and not stopped and not failures):
      while queue and len(running) < parallel and not stopped and not failures:
        run = queue.pop(0)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        resume = status(run) == "interrupted"
        with open(run.out_dir / "train.log", "a") as log:  # the child keeps its own handle
          process = subprocess.Popen(command(run, resume), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running.append((process, run))
        say(f"{run.out_dir.name}: {'continuing' if resume else 'training'} ({len(todo) - len(queue)} of {len(todo)})")
      for process, run in list(running):
        if process.poll() is not None:
          running.remove((process, run))
          if (failure := _ended(run, process.returncode, say)) is not None:
            failures.append(failure)
            stop_all()
      time.sleep(0.2)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if failures:
    raise UserError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
  if stopped:
    unfinished = sum(status(run) in ("new", "interrupted") for run in todo)
    raise UserError(f"stopped by {stopped[0]}: {unfinished} runs unfinished; the same command continues them")


def run_result(run: Run) -> dict:
  """What the tables say of one run."""
  rows = _rows(run)
  evaluated = [row for row in rows if row["kind"] == "eval"]
  speeds = [row["tokens_per_s"] for row in rows if row["kind"] == "train" and row.get("tokens_per_s")]
  return {"variant": run.label, "seed": run.seed, "diverged": (run.out_dir / DIVERGED_FILE).is_file(),
          "val_loss": evaluated[-1]["val_loss"] if evaluated else math.nan,
          "tokens_per_s": statistics.median(speeds) if speeds else math.nan,
          "curve": [(row["step"], row["val_loss"]) for row in evaluated], "rows": rows}


def steps_to(curve, target: float) -> int | None:
  return next((step for step, loss in curve if loss <= target), None)


def summarise(runs: list[Run], results: list[dict], target: float | None) -> tuple[float, list[dict]]:
  """(the target loss, a row per variant in the grid's order)."""
  finite = [r["val_loss"] for r in results if not r["diverged"] and math.isfinite(r["val_loss"])]
  target = target if target is not None else (max(finite) if finite else math.nan)
  table = {}
  for run, result in zip(runs, results):
    table.setdefault(run.variant, []).append(result)
  summary = []
  for variant, group in table.items():
    kept = [r for r in group if not r["diverged"]]
    losses = [r["val_loss"] for r in kept]
    reached = [steps for r in kept if (steps := steps_to(r["curve"], target)) is not None]
    summary.append({
        **dict(variant), "runs": len(group), "diverged": len(group) - len(kept),
        "val_loss_mean": statistics.fmean(losses) if losses else math.nan,
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0 if losses else math.nan,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in group),
        "steps_to_target": statistics.fmean(reached) if reached else math.nan, "reached_target": len(reached)})
  return target, summary


def markdown(keys: list[str], target: float, summary: list[dict], heading: str) -> str:
  head = [key.split(".", 1)[1] for key in keys] + ["runs", "val loss (mean ± std)", "tokens/s",
                                                   f"steps to val ≤ {target:.3f}", "diverged"]
  lines = [heading, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in summary:
    reached = (f"{row['steps_to_target']:.0f}" if row["reached_target"] else "not reached") + \
        (f" ({row['reached_target']} of {row['runs'] - row['diverged']})"
         if 0 < row["reached_target"] < row["runs"] - row["diverged"] else "")
    loss = f"{row['val_loss_mean']:.4f} ± {row['val_loss_std']:.4f}" if row["runs"] > row["diverged"] else "n/a"
    cells = [str(row[key]) for key in keys] + [str(row["runs"]), loss, f"{row['tokens_per_s']:,.0f}", reached,
                                                f"{row['diverged']} of {row['runs']}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _csv(rows: list[dict], columns: list[str]) -> str:
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return text.getvalue()


def _write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def report(runs: list[Run], keys: list[str], out: pathlib.Path, target: float | None, heading: str, title: str) -> str:
  """Writes sweep.md, sweep.csv, runs.csv and sweep.png; returns the Markdown table."""
  results = [run_result(run) for run in runs]
  target, summary = summarise(runs, results, target)
  table = markdown(keys, target, summary, heading)
  _write(out / "sweep.md", table)
  _write(out / "sweep.csv", _csv([{**row, "target_loss": target} for row in summary],
                                 [*keys, "runs", "diverged", "val_loss_mean", "val_loss_std", "tokens_per_s",
                                  "target_loss", "steps_to_target", "reached_target"]))
  _write(out / "runs.csv", _csv([{**dict(run.variant), **result, "out_dir": run.out_dir} for run, result in zip(runs, results)],
                                [*keys, "seed", "val_loss", "tokens_per_s", "diverged", "out_dir"]))
  groups = {}
  for result in results:
    groups.setdefault(result["variant"], []).append(result["rows"])
  plots.draw_validation(groups, str(out / "sweep.png"), title)
  return table


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a named config (configs/NAME.yaml) or a YAML file")
  parser.add_argument("overrides", nargs="*", help="section.field=value for every run, e.g. train.max_iters=600")
  parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2", help="a setting to vary (repeatable)")
  parser.add_argument("--seeds", type=int, default=1, help="runs per variant, train.seed counting up from the config's")
  parser.add_argument("--out", default=None, help="the sweep's folder (default: out/sweep_CONFIG)")
  parser.add_argument("--parallel", type=int, default=1, help="runs trained at once (default 1)")
  parser.add_argument("--target-loss", type=float, default=None, help="the validation loss to count steps to")
  args = parser.parse_intermixed_args(argv)
  if args.seeds < 1 or args.parallel < 1:
    raise UserError("--seeds and --parallel must be at least 1")
  out = pathlib.Path(args.out or os.path.join("out", f"sweep_{pathlib.Path(args.config).stem}"))
  axes = parse_vary(args.vary)
  runs = plan(args.config, args.overrides, axes, args.seeds, out)
  out.mkdir(parents=True, exist_ok=True)
  _write(out / "sweep.json", json.dumps({"config": args.config, "overrides": args.overrides, "vary": dict(axes),
                                         "seeds": args.seeds}, indent=2) + "\n")
  todo = [run for run in runs if status(run) in ("new", "interrupted")]
  print(f"sweep of {args.config}: {len(runs)} runs ({len(runs) // args.seeds} variants x {args.seeds} seeds), "
        f"{len(todo)} to train, {args.parallel} at a time, in {out}", flush=True)

  def command(run: Run, resume: bool) -> list[str]:
    return [sys.executable, "-m", "gptjax.cli", "train", args.config, *args.overrides, *run.overrides(),
            "--no-progress", *(["--resume"] if resume else [])]

  train_runs(todo, command, args.parallel, lambda line: print(line, flush=True))
  if unfinished := [run.out_dir.name for run in runs if status(run) in ("new", "interrupted")]:  # stopped from outside
    raise UserError(f"{', '.join(unfinished)} did not finish; the same command continues them")
  steps = sorted({run.max_iters for run in runs})
  heading = (f"Sweep of {args.config}{''.join(f' {o}' for o in args.overrides)}: {args.seeds} seed"
             f"{'s' * (args.seeds > 1)} per variant, the validation loss at step {'/'.join(map(str, steps))}:")
  title = f"{args.config}: validation loss (colour: variant" + (", line style: seed)" if args.seeds > 1 else ")")
  print(report(runs, [key for key, _ in axes], out, args.target_loss, heading, title), end="")
  print(f"{out}/sweep.md, sweep.csv, runs.csv, sweep.png")
