"""A run's record of itself, for people and for plots:

- OUT_DIR/metrics.jsonl: a JSON row per log line and per evaluation ({"kind", "step", "tokens",
  values...}), kept across resumes: a resumed run first drops the rows past the step it resumes
  from, so the file is the history of the checkpoint's own steps. `gptjax plot` and loss.png read it.
- OUT_DIR/tensorboard: TensorBoard event files, written with tensorboardX (no TensorFlow); a resumed
  run hides the events past its step. Open them with `tensorboard --logdir OUT_DIR/tensorboard`.
- Weights & Biases, when train.wandb_project names a project (the `wandb` extra; off by default).
  A resumed run continues the same W&B run, but W&B keeps only steps past the highest it has: the
  steps a rewound run trains again are in the other two only.

Only process 0 writes.
"""

import contextlib
import html
import json
import logging
import os
import pathlib
import sys
import time
import uuid

from gptjax import config as config_lib
from gptjax.errors import SaveFailed
from gptjax.errors import UserError

METRICS_FILE = "metrics.jsonl"
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)  # a NaN loss is recorded as it is, without a warning


def read_rows(out_dir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl (a line cut short by a crash is skipped)."""
  path = pathlib.Path(out_dir) / METRICS_FILE
  if not path.is_file():
    raise UserError(f"no {METRICS_FILE} in {out_dir}: not the out_dir of a run that has logged a step")
  rows = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


@contextlib.contextmanager
def stop_if_unwritable(what: str, step: int):
  """A write that fails (a full disk) stops the run with one line, as a failed save does."""
  try:
    yield
  except OSError as e:
    raise SaveFailed(f"writing {what} at step {step} failed ({e.strerror}); the run stopped, the checkpoints "
                     "before it are intact") from None


@contextlib.contextmanager
def _torch_unimportable():
  """Inside, `import torch` fails as if torch were not installed, unless it is imported already."""
  absent = "torch" not in sys.modules
  if absent:
    sys.modules["torch"] = None  # the import system's marker for a module that cannot be imported
  try:
    yield
  finally:
    if absent and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]


class EventFile:
  """TensorBoard events written at once, in this thread: tensorboardX's `EventsWriter` and summaries,
  without `SummaryWriter`'s writer thread, so that a failing disk raises at the write (and nothing
  waits on the queue of a writer that has died). Its first event hides the events from
  `purge_step` on that earlier files hold, as `SummaryWriter(purge_step=)` does."""

  def __init__(self, logdir: str, purge_step: int):
    with _torch_unimportable():  # tensorboardX imports torch, where installed, only to accept its tensors (3 s)
      from tensorboardX import event_file_writer, summary  # noqa: PLC0415
      from tensorboardX.proto import event_pb2  # noqa: PLC0415
    self.summary, self.event_pb2 = summary, event_pb2
    os.makedirs(logdir, exist_ok=True)
    # Named by the second and the host, as TensorBoard expects, and a random suffix: a file is opened
    # for writing from its start, and a run resumed within the second must not write over its first part.
    self.events = event_file_writer.EventsWriter(os.path.join(logdir, "events"), f".{uuid.uuid4().hex[:8]}")
    self.events.write_event(event_pb2.Event(step=purge_step, file_version="brain.Event:2"))
    self.events.write_event(event_pb2.Event(step=purge_step, session_log=event_pb2.SessionLog(
        status=event_pb2.SessionLog.START)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for tag, value in values.items():  # NaN and inf are kept as they are
      self._write(step, self.summary.scalar(tag, value))
    self.events.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    markdown = "    " + text.replace("\n", "\n    ")  # indented: shown as written
    self._write(step, self.summary.text(tag, markdown))
    self.events.flush()

  def _write(self, step: int, summary) -> None:
    self.events.write_event(self.event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self.events.close()


class Record:
  """Where the numbers a run logs go. `write(kind, step, values)`: a row, and each value as the
  scalar `kind/name`; `text(step, tag, text)`: text (TensorBoard and W&B only). A write that fails
  stops the run with one line."""

  def __init__(self, cfg: config_lib.Config, start_step: int, resume: bool):
    t = cfg.train
    self.path, self.where = pathlib.Path(t.out_dir) / METRICS_FILE, f"the record in {t.out_dir}"
    self.rows = [row for row in read_rows(t.out_dir) if row["step"] <= start_step] \
        if resume and self.path.is_file() else []
    self.tokens_per_step = cfg.tokens_per_step
    last = self.rows[-1] if self.rows else {"step": 0, "tokens": 0}
    self.start_step, self.start_tokens = start_step, last["tokens"] + (start_step - last["step"]) * self.tokens_per_step
    with stop_if_unwritable(self.where, start_step):
      tmp = self.path.with_name(METRICS_FILE + ".tmp")
      tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows), encoding="utf-8")
      os.replace(tmp, self.path)
      self.file = open(self.path, "a", encoding="utf-8")
      # A fresh run's too: a run that died before its first checkpoint may have left events.
      self.tensorboard = EventFile(os.path.join(t.out_dir, "tensorboard"), start_step + 1) if t.tensorboard else None
    self.wandb = _start_wandb(cfg) if t.wandb_project else None

  def tokens(self, step: int) -> int:
    """Tokens trained on by the end of `step` (this run's batch size since it started or resumed)."""
    return self.start_tokens + (step - self.start_step) * self.tokens_per_step

  def write(self, kind: str, step: int, values: dict) -> None:
    row = {"kind": kind, "step": step, "tokens": self.tokens(step), "time": round(time.time(), 3), **values}
    self.rows.append(row)
    scalars = {f"{kind}/{name}": value for name, value in values.items()}
    with stop_if_unwritable(self.where, step):
      self.file.write(json.dumps(row) + "\n")
      self.file.flush()
      if self.tensorboard is not None:
        self.tensorboard.scalars(step, scalars)
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)

  def text(self, step: int, tag: str, text: str) -> None:
    if self.tensorboard is not None:
      with stop_if_unwritable(self.where, step):
        self.tensorboard.text(step, tag, text)
    if self.wandb is not None:
      import wandb  # noqa: PLC0415 (an optional extra, imported by _start_wandb already)
      self.wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

  def close(self) -> None:
    """Closes the files; a failure here was met, and reported, by a write before."""
    for writer in (self.file, self.tensorboard):
      with contextlib.suppress(OSError):
        if writer is not None:
          writer.close()
    if self.wandb is not None:
      self.wandb.finish()


def _start_wandb(cfg: config_lib.Config):
  """A W&B run for this out_dir: the same run again when resumed (its id is kept in OUT_DIR/wandb_id)."""
  try:
    import wandb  # noqa: PLC0415 (an optional extra)
  except ImportError:
    raise UserError("train.wandb_project needs Weights & Biases: pip install 'gptjax[wandb]'") from None
  id_file = pathlib.Path(cfg.train.out_dir) / "wandb_id"
  try:
    if not id_file.is_file():
      id_file.write_text(uuid.uuid4().hex[:16])
    return wandb.init(project=cfg.train.wandb_project, id=id_file.read_text().strip(), resume="allow",
                      name=os.path.basename(os.path.normpath(cfg.train.out_dir)), dir=cfg.train.out_dir,
                      config=config_lib.to_dict(cfg))
  except Exception as e:  # W&B raises its own types (no API key, no network) and OSError
    raise UserError(f"Weights & Biases did not start ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    "log in with `wandb login`, set WANDB_MODE=offline, or leave train.wandb_project empty") from None
