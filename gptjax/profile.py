"""Profiles of training steps: `train.profile=START:END` traces the steps after START up to END
with `jax.profiler` into OUT_DIR/profile, which TensorBoard's profile plugin, XProf and Perfetto
open; `summarize` reads such a trace back as a table of where the time went, which is written
beside it (summary.json: [operation, ms per step, share] rows, largest first).

    gptjax train shakespeare_char_cpu train.profile=100:105
    tensorboard --logdir out/shakespeare_char_cpu/profile     # with tensorboard-plugin-profile
"""

import collections
import json
import os
import pathlib
import re
from typing import Callable

import jax

from gptjax.steps import TrainState


class Profile:
  """A hook run after every step: starts the trace once step `start` is done, stops it after step
  `end` (waiting for that step), and logs where the trace is and the operations that took most of
  its time (named from `compiled_text`, the train step's; the whole table goes to summary.json). `close` stops a trace that a loop
  ending early left open."""

  def __init__(self, out_dir: str, start: int, end: int, log: Callable[[str], None], compiled_text: str):
    self.dir, self.start, self.end, self.log = os.path.join(out_dir, "profile"), start, end, log
    self.compiled_text = compiled_text
    self.active = False

  def __call__(self, step: int, state: TrainState, step_metrics: dict) -> None:
    if step == self.start and not self.active:
      jax.block_until_ready(step_metrics)  # the trace holds whole steps
      jax.profiler.start_trace(self.dir)
      self.active = True
    elif step == self.end and self.active:
      jax.block_until_ready(step_metrics)
      self.close()
      self.log(f"profile of steps {self.start + 1}-{self.end} written to {self.dir} "
               "(open it with TensorBoard's profile plugin, XProf or ui.perfetto.dev)")
      table = summarize(trace_files(self.dir)[-1], op_names(self.compiled_text), self.end - self.start)
      pathlib.Path(self.dir, "summary.json").write_text(json.dumps(table))
      if table:  # named operations were found on the device's timelines
        self.log("most of the time: " + ", ".join(f"{name} {share:.0%}" for name, _, share in table[:5]))

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def trace_files(trace_dir: str) -> list[pathlib.Path]:
  """The XSpace files of the traces under `trace_dir`, oldest first."""
  return sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)


def op_names(compiled_text: str) -> dict[str, str]:
  """{HLO instruction name: the JAX operation it came from} in a compiled executable's text,
  'forward' or 'backward' then the primitive (dot_general, exp, ...)."""
  names = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', compiled_text, re.MULTILINE):
    path = match.group(2)
    names[match.group(1)] = f"{'backward' if 'transpose(' in path else 'forward'} {path.rsplit('/', 1)[-1]}"
  return names


def summarize(trace: pathlib.Path, names: dict[str, str], steps: int) -> list[tuple[str, float, float]]:
  """[(operation, ms per step, share of the total)], largest first: the time of the XLA
  operations on the device's (or the CPU's compute threads') timelines, grouped by what
  `names` (see `op_names`) says each came from."""
  totals = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
    compute = plane.name.startswith("/device:") or plane.name == "/host:CPU"
    for line in plane.lines if compute else ():
      if plane.name == "/host:CPU" and "XLAEigen" not in line.name:  # the CPU's compute threads only
        continue
      for event in line.events:
        base = re.sub(r"\.\d+$", "", event.name)
        if event.name in names or base in names:
          totals[names.get(event.name, names.get(base))] += event.duration_ns
  whole = sum(totals.values()) or 1
  return [(name, ns / 1e6 / steps, ns / whole) for name, ns in totals.most_common()]
