"""Loss curves with matplotlib: OUT_DIR/loss.png, redrawn at each evaluation of a run, `gptjax
plot` to compare runs in one figure, and a sweep's validation curves (`gptjax sweep`).

    gptjax plot out/shakespeare_char_cpu                       # -> plot.png
    gptjax plot out/shakespeare_char_cpu out/llama_shakespeare_cpu --output compare.png

Three panels: the loss against steps, the loss against tokens (where runs of other batch sizes line
up), and the learning rate beneath. Each run has a colour: its training loss at every log step is
the faint line, its evaluations' losses the dots (solid: validation, dashed: training).
Both read OUT_DIR/metrics.jsonl (`gptjax.record`).
"""

import argparse
import contextlib
import os

from gptjax import record
from gptjax.errors import UserError

SIZE_INCHES, DPI = (8.0, 9.0), 100


def _pyplot():
  """matplotlib's pyplot on its file-only backend (Agg), imported when a figure is first drawn: half
  a second that a run spends at its first evaluation rather than before its first step."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def draw(runs: dict[str, list[dict]], path: str, title: str) -> None:
  """The loss and learning-rate panels of `runs` ({label: metrics rows}), written to `path`."""
  fig, (by_step, by_tokens, lr) = _pyplot().subplots(3, 1, figsize=SIZE_INCHES, dpi=DPI, layout="constrained",
                                               height_ratios=(3, 3, 1.6))
  single = len(runs) == 1
  for n, (label, rows) in enumerate(runs.items()):
    color, prefix = f"C{n}", "" if single else f"{label}: "
    logged = [row for row in rows if row["kind"] == "train"]
    evaluated = [row for row in rows if row["kind"] == "eval"]
    for ax, x in ((by_step, "step"), (by_tokens, "tokens")):
      ax.plot([r[x] for r in logged], [r["loss"] for r in logged], color=color, alpha=0.3, lw=1,
              label=f"{prefix}train loss (log steps)")
      ax.plot([r[x] for r in evaluated], [r["train_loss"] for r in evaluated], "o--", color=color, ms=3, lw=1,
              label=f"{prefix}train loss (evaluation)")
      ax.plot([r[x] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", color=color, ms=4, lw=1.5,
              label=f"{prefix}val loss")
    lr.plot([r["step"] for r in logged], [r["lr"] for r in logged], color=color, label=label)
  by_step.set(title=title, xlabel="step", ylabel="loss")
  by_tokens.set(xlabel="tokens", ylabel="loss")
  lr.set(xlabel="step", ylabel="learning rate")
  for ax in (by_step, by_tokens, lr):
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  _save(fig, path)


LINE_STYLES = ("-", "--", ":", "-.")


def draw_validation(groups: dict[str, list[list[dict]]], path: str, title: str) -> None:
  """The validation loss against steps of every run in `groups` ({label: [runs' metrics rows]}): a
  colour per group, a line style per run within it (the seeds of a sweep's variant), to `path`."""
  fig, ax = _pyplot().subplots(figsize=(8.0, 5.5), dpi=DPI, layout="constrained")
  for n, (label, runs) in enumerate(groups.items()):
    for i, rows in enumerate(runs):
      evaluated = [row for row in rows if row["kind"] == "eval"]
      ax.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], LINE_STYLES[i % len(LINE_STYLES)],
              color=f"C{n % 10}", marker="o", ms=2.5, lw=1.3, label=label if i == 0 else None)
  ax.set(title=title, xlabel="step", ylabel="validation loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def _save(fig, path: str) -> None:
  """Writes `fig` whole (beside the target, then renamed: a viewer never finds half a file) and closes it."""
  tmp = f"{path}.tmp"
  try:
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  finally:
    _pyplot().close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="runs' out_dirs")
  parser.add_argument("--output", default="plot.png", help="the PNG to write (default: plot.png)")
  args = parser.parse_args(argv)
  if not args.output.lower().endswith(".png"):
    raise UserError(f"--output {args.output} does not end in .png")
  runs = {run: record.read_rows(run) for run in args.runs}
  try:
    draw(runs, args.output, "loss" if len(runs) > 1 else f"loss of {args.runs[0]}")
  except OSError as e:
    raise UserError(f"cannot write {args.output}: {e.strerror}") from None
  print(f"{', '.join(args.runs)}: {args.output}")
