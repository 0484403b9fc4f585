"""`gptjax sweep`: a grid of runs, each trained once, tabled and drawn; resumed after an interruption."""

import csv
import signal
import statistics
import time

import pytest

from PIL import Image

from gptjax import checkpoint

from conftest import digest, run_cli, start_cli

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=4",
        "train.max_iters=6", "train.eval_interval=2", "train.eval_iters=2", "train.log_interval=1", "train.sample_tokens=0"]


def _sweep_args(char_data, out, *flags, overrides=()):
  """A sweep of the tiny model; `overrides` replace TINY's of the same key."""
  merged = {item.split("=")[0]: item for item in [*TINY, *overrides]}
  return ["sweep", "shakespeare_char_cpu", f"data.dir={char_data}", *merged.values(), *flags, "--out", out]


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_a_grid_is_trained_tabled_and_drawn_once(char_data, tmp_path):
  out = tmp_path / "sweep"
  args = _sweep_args(char_data, out, "--vary", "model.norm_position=pre,post", "--seeds", "2", "--parallel", "2")
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr
  assert "4 runs (2 variants x 2 seeds), 4 to train, 2 at a time" in result.stdout
  summary, runs = _rows(out / "sweep.csv"), _rows(out / "runs.csv")
  assert [row["model.norm_position"] for row in summary] == ["pre", "post"]
  assert sorted((row["model.norm_position"], row["seed"]) for row in runs) == [
      ("post", "1337"), ("post", "1338"), ("pre", "1337"), ("pre", "1338")]
  for row in summary:  # the mean and spread of the seeds' last validation losses
    losses = [float(r["val_loss"]) for r in runs if r["model.norm_position"] == row["model.norm_position"]]
    assert abs(float(row["val_loss_mean"]) - statistics.fmean(losses)) < 1e-9
    assert abs(float(row["val_loss_std"]) - statistics.stdev(losses)) < 1e-9 and float(row["val_loss_std"]) > 0
    assert row["diverged"] == "0" and float(row["tokens_per_s"]) > 0
  target = max(float(r["val_loss"]) for r in runs)  # the default target: every run reached it
  assert all(float(row["target_loss"]) == target and row["reached_target"] == "2" for row in summary)
  table = (out / "sweep.md").read_text()
  assert "| pre | 2 | " in table and "| post | 2 | " in table and f"steps to val ≤ {target:.3f}" in table
  with Image.open(out / "sweep.png") as figure:
    assert figure.format == "PNG"
  trained = {p.name: digest(p) for p in out.iterdir() if p.is_dir()}

  again = run_cli(*args)
  assert again.returncode == 0, again.stderr
  assert "0 to train" in again.stdout and "training" not in again.stdout
  assert {p.name: digest(p) for p in out.iterdir() if p.is_dir()} == trained
  assert (out / "sweep.md").read_text() == table


@pytest.mark.slow  # 47 s; a sweep's re-run (the grid test) and a run's resume (test_train) stay in the default suite
def test_an_interrupted_sweep_continues_where_it_stopped(char_data, tmp_path):
  out = tmp_path / "sweep"
  args = _sweep_args(char_data, out, "--vary", "model.positions=learned,none",
                     overrides=["train.max_iters=1500", "train.eval_interval=750", "train.log_interval=10",
                                "train.checkpoint_interval=750"])
  process = start_cli(*args)
  first = out / "model.positions=learned,seed=1337"
  deadline = time.monotonic() + 300
  while not ((first / "metrics.jsonl").is_file() and '"kind": "train"' in (first / "metrics.jsonl").read_text()):
    assert time.monotonic() < deadline and process.poll() is None, process.communicate()
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)  # the run under way saves its step
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 2 and "stopped by SIGTERM: 2 runs unfinished; the same command continues them" in stderr
  manager = checkpoint.open_manager(str(first), create=False)
  stopped_at = manager.latest_step()
  manager.close()
  assert 0 < stopped_at < 1500
  assert not (out / "model.positions=none,seed=1337").exists()

  result = run_cli(*args)
  assert result.returncode == 0, result.stderr
  assert "model.positions=learned,seed=1337: continuing" in result.stdout
  assert f"resuming at step {stopped_at} of 1500" in (first / "train.log").read_text()
  assert [row["diverged"] for row in _rows(out / "sweep.csv")] == ["0", "0"]


def test_a_run_that_diverges_is_recorded_and_not_trained_again(char_data, tmp_path):
  out = tmp_path / "sweep"
  args = _sweep_args(char_data, out, "--vary", "optim.learning_rate=1e30",
                     overrides=["train.max_bad_steps=2", "optim.warmup_iters=0"])
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr
  assert "diverged (gptjax: error: the loss or gradients were not finite" in result.stdout
  assert "| 1e30 | 1 | n/a |" in (out / "sweep.md").read_text() and "| 1 of 1 |" in (out / "sweep.md").read_text()
  again = run_cli(*args)
  assert again.returncode == 0 and "0 to train" in again.stdout
