"""A run's record: metrics.jsonl, TensorBoard events (read back with TensorBoard's own reader),
the sample text at each evaluation, and loss.png, across a resume that rewinds."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from gptjax import checkpoint
from gptjax import plots
from gptjax import prepare
from gptjax import record
from gptjax import sources
from gptjax import train

from conftest import tiny_config


def tensorboard_events(out_dir):
  events = event_accumulator.EventAccumulator(str(out_dir / "tensorboard"), size_guidance={
      event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
  events.Reload()
  return events


def scalars(events, tag):
  return {event.step: event.value for event in events.Scalars(tag)}


def rows_of(out_dir, kind, name):
  return {row["step"]: row[name] for row in record.read_rows(out_dir) if row["kind"] == kind and name in row}


def check_loss_png(path):
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == tuple(round(x * plots.DPI) for x in plots.SIZE_INCHES)


def test_tensorboard_holds_what_the_run_logged(tiny_run):
  run, _ = tiny_run
  events = tensorboard_events(run)
  for kind, name, steps in (("train", "loss", [5, 10, 15, 20, 25, 30]), ("train", "lr", [5, 10, 15, 20, 25, 30]),
                            ("train", "grad_norm", [5, 30]), ("train", "tokens_per_s", [5, 30]),
                            ("train", "skipped_steps", [5, 30]), ("train", "mfu", [5, 30]), ("eval", "train_loss", [15, 30]),
                            ("eval", "val_loss", [15, 30]), ("memory", "host_peak_rss_mib", [5, 30]),
                            ("norms", "grad/layer_0", [5, 30]), ("norms", "param/wte", [5, 30])):
    logged, read = rows_of(run, kind, name), scalars(events, f"{kind}/{name}")
    assert set(steps) <= set(read) and set(read) == set(logged), (kind, name)
    np.testing.assert_allclose([read[s] for s in logged], list(logged.values()), rtol=1e-6)
  assert scalars(events, "memory/parameters_mib")[0] > 0
  samples = {event.step: event.tensor_proto.string_val[0].decode() for event in events.Tensors("sample/text_summary")}
  assert sorted(samples) == [15, 30] and all(len(text.strip()) > 0 for text in samples.values())
  tokens = rows_of(run, "train", "tokens")
  assert tokens[30] == 30 * 8 * 32  # steps x batch x block
  check_loss_png(run / "loss.png")


@pytest.mark.slow  # 46 s; the suite's time
def test_a_resume_that_rewinds_drops_the_record_past_its_checkpoint(tmp_path, char_data):
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=20", "train.eval_interval=10",
                    "train.checkpoint_interval=10")
  train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  out = tmp_path / "out"
  first = rows_of(out, "eval", "val_loss")
  shutil.rmtree(out / "checkpoints" / "20")  # as if the run had died after logging step 20, before saving it
  train.train(cfg, resume=True, progress_bar=False, devices=jax.devices()[:1])
  steps = [(row["kind"], row["step"]) for row in record.read_rows(out) if row["kind"] not in ("memory", "norms")]
  assert steps == [("train", 5), ("train", 10), ("eval", 10), ("train", 15), ("train", 20), ("eval", 20)]
  assert rows_of(out, "eval", "val_loss") == first  # resumed exactly: the same losses again
  events = tensorboard_events(out)
  assert scalars(events, "eval/val_loss") == {step: np.float32(loss) for step, loss in first.items()}
  assert sorted(scalars(events, "train/loss")) == [5, 10, 15, 20]
  check_loss_png(out / "loss.png")
  train.train(cfg, resume=True, progress_bar=False, devices=jax.devices()[:1])  # finished: reports, adds nothing
  assert [(row["kind"], row["step"]) for row in record.read_rows(out) if row["kind"] not in ("memory", "norms")] == steps
  assert sorted(scalars(tensorboard_events(out), "eval/val_loss")) == [10, 20]


@pytest.mark.slow  # 15 s for an optional extra
def test_weights_and_biases_gets_the_same_values_offline(tmp_path, char_data, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")  # written to OUT_DIR/wandb, for `wandb sync`; nothing is sent
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=10", "train.eval_interval=5",
                    "train.checkpoint_interval=10", "train.wandb_project=gptjax-test", "train.sample_tokens=8")
  train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  out = tmp_path / "out"
  run_id = (out / "wandb_id").read_text()
  [run_file] = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
  logged = run_file.read_bytes()  # W&B's own record format: each value as JSON beside its key
  for kind, name in (("eval", "val_loss"), ("train", "loss")):
    for value in rows_of(out, kind, name).values():
      assert f"{kind}/{name}".encode() in logged and json.dumps(value).encode() in logged
  assert b"sample" in logged


def test_named_eval_sets_and_a_mixtures_folders_are_reported_and_one_ranks_the_checkpoints(tmp_path, char_data, capsys):
  other = tmp_path / "other"
  prepare.prepare(sources.BUILTIN_SHAKESPEARE, "char", str(other), val_fraction=0.2)  # the same characters
  cfg = tiny_config(tmp_path, f"data.mixture={char_data}:1,{other}:1", f"data.eval_sets=again:{other}",
                    "train.best_of=again")
  result, _ = train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  out = tmp_path / "out"
  names = [char_data.name, "other", "again"]  # the mixture's two folders, then the named set
  events = tensorboard_events(out)
  for name in names:
    logged = rows_of(out, "eval", f"{name}/loss")
    assert sorted(logged) == [15, 30] and result[f"{name}/loss"] == logged[30]
    assert scalars(events, f"eval/{name}/loss") == {s: np.float32(v) for s, v in logged.items()}
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 30: train loss")]
  assert lines and all(f", {name} loss " in lines[0] for name in names)
  again = rows_of(out, "eval", "again/loss")
  assert checkpoint.open_manager(str(out), create=False).best_step() == min(again, key=again.get)
