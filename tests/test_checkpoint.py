import os
import pathlib
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax import checkpoint
from gptjax import config as config_lib

from conftest import digest, load_checkpoint, one_line_error, run_cli, start_cli, tiny, tiny_config


def test_keeps_the_latest_and_the_best_by_validation_loss(tmp_path):
  manager = checkpoint.open_manager(str(tmp_path), keep=2)
  params = {"w": jnp.arange(4.0)}
  for step, val_loss in [(10, 1.5), (20, 3.0), (30, 2.5), (40, 2.8)]:
    checkpoint.save(manager, step, params=params, opt_state={"mu": params["w"] * step},
                    progress={"step": step}, config=config_lib.Config(), tokenizer={"kind": "gpt2"},
                    val_loss=val_loss)
  manager.wait_until_finished()
  assert manager.all_steps() == [10, 30, 40]  # the best (10) and the latest two
  assert checkpoint.select_step(manager, str(tmp_path), "best") == 10
  assert checkpoint.select_step(manager, str(tmp_path), "latest") == 40
  cfg, tokenizer = checkpoint.read_config(manager, 30)
  assert cfg == config_lib.Config() and tokenizer == {"kind": "gpt2"}
  abstract = {"w": jnp.zeros(4)}
  _, opt_state, progress = checkpoint.restore_train_state(manager, 30, abstract, {"mu": jnp.zeros(4)})
  np.testing.assert_array_equal(opt_state["mu"], np.arange(4.0) * 30)
  assert progress == {"step": 30}
  manager.close()


def _save_linen_layout_run(out_dir, char_data):
  """A run directory as gptjax 0.1 (Flax Linen) wrote it: blocks h_0..h_N, no `format` item."""
  cfg = config_lib.to_dict(tiny_config(out_dir, f"data.dir={char_data}"))
  cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "scan_layers"} | {"remat": False}
  block = {"ln_1": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}
  params = {"wte": {"embedding": jnp.zeros((77, 32))}, "h_0": block, "h_1": block}
  manager = checkpoint.open_manager(str(out_dir))
  manager.save(15, metrics={"val_loss": 2.5}, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave({"mu": params}),
      progress=ocp.args.JsonSave({"step": 15, "data": {"seed": 1337, "step": 15}}),
      config=ocp.args.JsonSave(cfg), tokenizer=ocp.args.JsonSave({"kind": "char", "chars": "ab"})))
  manager.wait_until_finished()
  manager.close()


def test_a_checkpoint_of_the_old_layout_is_refused_with_the_way_forward(tmp_path, char_data):
  old = tmp_path / "old"
  _save_linen_layout_run(old, char_data)
  before = digest(old)
  how = ("layout 1", "h_0..h_N", "gptjax convert export")
  one_line_error(run_cli("sample", "--checkpoint", old, "--max-new-tokens", 5), *how)
  one_line_error(run_cli("perplexity", "--checkpoint", old, "--split", "val"), *how)
  one_line_error(run_cli("convert", "export", old, tmp_path / "hf"), *how)
  one_line_error(run_cli("train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.out_dir={old}"),
                         "--resume"), *how)
  one_line_error(run_cli("train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.init_from={old}",
                                                                 f"train.out_dir={tmp_path / 'tuned'}")), *how)
  assert digest(old) == before and not (tmp_path / "hf").exists()


def test_every_checkpoint_records_its_layout(tiny_run):
  out_dir, _ = tiny_run
  manager = checkpoint.open_manager(str(out_dir), create=False)
  for step in manager.all_steps():
    checkpoint.check_format(manager, step)  # raises for any other layout
    assert (pathlib.Path(manager.directory) / str(step) / "format").is_dir()
  manager.close()


def _train_args(char_data, out, *extra):
  return ["train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.out_dir={out}", *extra),
          "--no-progress"]


def test_a_save_that_fails_stops_the_run_and_the_earlier_checkpoints_load(tmp_path, char_data):
  """Writes start failing while the trainer runs (its file-size limit set to 0, so every write
  fails as on a full disk): the next save fails, the run stops at once with one line, and the
  checkpoints before it load."""
  out = tmp_path / "out"
  process = start_cli(*_train_args(char_data, out, "train.max_iters=100000", "train.log_interval=1",
                                   "train.checkpoint_interval=10", "train.eval_interval=10", "train.keep_checkpoints=100"))
  for line in process.stdout:
    if line.startswith("step 15: loss"):
      break
  while not (out / "checkpoints" / "10").is_dir() and process.poll() is None:  # written in the background
    time.sleep(0.05)
  resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (0, 0))
  stdout, stderr = process.communicate(timeout=300)
  one_line_error(subprocess.CompletedProcess([], process.returncode, stdout, stderr),
                 "failed (File too large); the run stopped, the checkpoints before it are intact")
  # The first write after the limit fails: a checkpoint, or the run's record (metrics.jsonl, loss.png).
  failed = int(re.search(r"(?:saving the checkpoint of|writing .* at) step (\d+)", stderr).group(1))
  last_step = max(int(s) for s in re.findall(r"^step (\d+): loss", stdout, re.MULTILINE))
  assert failed > 10 and failed <= last_step <= failed + 10  # it stopped before the next save
  saved = (failed - 1) // 10 * 10
  manager = checkpoint.open_manager(str(out), create=False)
  assert manager.latest_step() == saved and max(manager.all_steps()) < failed
  manager.close()
  assert load_checkpoint(out, "latest")[3] == saved


def _in_own_mounts(script: str) -> subprocess.CompletedProcess:
  """Runs a shell script in a private mount namespace (where it may mount a tmpfs), or skips."""
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-m", "mount", "-t", "tmpfs", "none", "/mnt"], capture_output=True).returncode:
    pytest.skip("this machine does not let a test mount a file system")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)


def test_a_full_disk_stops_the_run_and_the_earlier_checkpoints_load(tmp_path, char_data):
  """A 2 MiB tmpfs holds a few checkpoints of the tiny model, then is full."""
  mount = tmp_path / "disk"
  mount.mkdir()
  cli = f"{shlex.quote(sys.executable)} -m gptjax.cli"
  train_cmd = shlex.join(_train_args(char_data, mount / "out", "train.max_iters=1000", "train.keep_checkpoints=1000",
                                     "train.checkpoint_interval=5", "train.eval_interval=5"))
  result = _in_own_mounts(f"mount -t tmpfs -o size=2m none {mount} && {cli} {train_cmd}; echo \"exit $?\" >&2; "
                          f"{cli} sample --checkpoint {mount / 'out'} --step latest --max-new-tokens 5 >&2")
  lines = result.stderr.strip().splitlines()
  assert lines[0].startswith("gptjax: error: saving the checkpoint of step") and "No space left on device" in lines[0], result.stderr
  assert lines[1] == "exit 2" and "Traceback" not in result.stderr
  assert len(lines) > 2 and "gptjax: error" not in result.stderr.split("exit 2")[1]  # the latest intact step samples


def test_an_out_dir_that_cannot_be_written(tmp_path, char_data):
  """A file, a path under /proc, a read-only file system, no room: refused before step 0."""
  (tmp_path / "file").write_text("not a directory")
  before = digest(tmp_path), digest(char_data)
  one_line_error(run_cli(*_train_args(char_data, tmp_path / "file")), "cannot create", "Not a directory")
  one_line_error(run_cli(*_train_args(char_data, "/proc/gptjax-run")), "cannot create /proc/gptjax-run/checkpoints")
  one_line_error(run_cli(*_train_args(char_data, tmp_path / "big", "model.n_layer=200", "model.n_embd=16384",
                                      "model.n_head=128")), "MiB free, a checkpoint of this run needs about")
  assert not (tmp_path / "big" / "gptjax.lock").exists()
  assert (digest(tmp_path), digest(char_data)) == before
  mount = tmp_path / "ro"
  mount.mkdir()
  cli = f"{shlex.quote(sys.executable)} -m gptjax.cli"
  result = _in_own_mounts(f"mount -t tmpfs -o ro,size=1m none {mount} && {cli} {shlex.join(_train_args(char_data, mount / 'out'))}")
  one_line_error(result, f"cannot create {mount / 'out' / 'checkpoints'}: Read-only file system")


def _damage(step_dir: pathlib.Path, how: str) -> None:
  """Deletes, truncates or flips a byte in the largest array file of a step's parameters."""
  largest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  if how == "deleted":
    largest.unlink()
  elif how == "truncated":
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  else:
    content = bytearray(largest.read_bytes())
    content[len(content) // 2] ^= 0x10
    largest.write_bytes(bytes(content))


@pytest.mark.parametrize("how", [pytest.param("deleted", marks=pytest.mark.slow),  # corrupted covers the fallback
                                 pytest.param("truncated", marks=pytest.mark.slow), "corrupted"])
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tiny_run, tmp_path, how):
  """The latest step (30) damaged: sample and perplexity warn and use step 15; asked for step 30
  itself, or with every step damaged, one line. Never a traceback, never random weights."""
  run = tmp_path / "run"
  shutil.copytree(tiny_run[0], run)
  _damage(run / "checkpoints" / "30", how)
  before = digest(run)
  warning = f"gptjax: warning: checkpoint step 30 in {run / 'checkpoints'} is damaged ("
  for command in (["sample", "--max-new-tokens", "5", "--step", "latest"], ["perplexity", "--split", "val"]):
    result = run_cli(*command, "--checkpoint", run)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(warning) and lines[0].endswith("; using step 15"), result.stderr
  one_line_error(run_cli("sample", "--checkpoint", run, "--step", "30"), "checkpoint step 30", "is damaged")
  assert digest(run) == before
  _damage(run / "checkpoints" / "15", how)
  before = digest(run)
  one_line_error(run_cli("sample", "--checkpoint", run), f"no intact checkpoint in {run}", "step 15", "step 30")
  assert digest(run) == before


def test_resume_passes_over_a_damaged_checkpoint_and_sets_it_aside(tiny_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(tiny_run[0], run)
  _damage(run / "checkpoints" / "30", "corrupted")
  result = run_cli("train", "shakespeare_char_cpu", *tiny(f"data.dir={tiny_run[1]}", f"train.out_dir={run}",
                                                         "train.max_iters=35"), "--resume", "--no-progress")
  assert result.returncode == 0, result.stderr
  damaged, moved = result.stderr.strip().splitlines()  # a flipped byte that decompresses: the checksum tells
  assert re.fullmatch(re.escape(f"gptjax: warning: checkpoint step 30 in {run / 'checkpoints'} is damaged (params[")
                      + r".*\] is not what was saved\); using step 15", damaged), damaged
  assert moved == f"gptjax: warning: moved the damaged checkpoint step 30 to {run / 'damaged'}"
  assert "resuming at step 15 of 35" in result.stdout
  assert load_checkpoint(run, "latest")[3] == 35 and (run / "checkpoints" / "30").is_dir()  # saved anew
  assert (run / "damaged" / "30" / "params").is_dir()


def test_start_up_probes_of_processes_with_one_pid_do_not_collide(tmp_path):
  """Containers on several hosts give their trainers the same pid; each probe is its own file."""
  import concurrent.futures  # noqa: PLC0415
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # threads: one pid, as the hosts would have
    list(pool.map(lambda _: checkpoint.create_dir(str(tmp_path), 0), range(200)))
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []
