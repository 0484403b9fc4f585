import dataclasses
import json
import random
import re
import signal
import socket
import time

import jax
import numpy as np
import pytest

from gptjax import checkpoint
from gptjax import hooks
from gptjax import config as config_lib
from gptjax import profile
from gptjax import record
from gptjax import steps as steps_lib
from gptjax import train

from conftest import digest, load_checkpoint, one_line_error, run_cli, start_cli, tiny, tiny_config


def _final_params(out_dir):
  return jax.device_get(load_checkpoint(str(out_dir), "latest")[2])


def test_training_lowers_the_loss(tmp_path, char_data):
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=60", "train.eval_iters=8",
                    "optim.learning_rate=3e-3", "optim.min_lr=3e-4")
  result, _ = train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  assert result["step"] == 60
  assert result["train_loss"] < np.log(77) - 1.0  # 4.34 at random init (77 characters)
  assert result["val_loss"] < np.log(77) - 1.0


def test_bfloat16_trains_on_a_cpu_mesh_with_float32_parameters_and_state(tmp_path, char_data, capsys):
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=60", "train.eval_iters=8", "model.dtype=bfloat16",
                    "optim.learning_rate=3e-3", "optim.min_lr=3e-4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  result, state = train.train(cfg, progress_bar=False, devices=jax.devices()[:8])
  assert result["val_loss"] < np.log(77) - 1.0
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {np.dtype("float32")}
  out = capsys.readouterr().out
  assert "attention: blocked (auto on cpu); matmuls in bfloat16" in out
  assert "MFU n/a: no peak FLOP/s known for device kind 'cpu'; set train.peak_flops_per_device" in out
  assert "not split: wte/embedding [77, 32]: vocab 77 over tensor=2 does not divide" in out  # 77 characters


# The named configs' own batch and context, on models shrunk to one narrow block so that a step is quick.
SHRUNK = {
    "gpt2_124m": ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"],
    "smollm2_135m": ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=1", "model.n_embd=32", "model.mlp_hidden=64"],
    "llama3_2_1b": ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=1", "model.head_dim=16", "model.n_embd=32",
                    "model.mlp_hidden=64"],
}
FSDP_BY_DEFAULT = {"llama3_2_1b"}


def _start_named(name, devices, tmp_path, char_data, capsys):
  stated = config_lib.load_config(name)
  cfg = config_lib.load_config(name, [*SHRUNK[name], f"data.dir={char_data}", f"train.out_dir={tmp_path / 'out'}",
                                      "train.max_iters=1", "train.eval_iters=1", "train.sample_tokens=0"])
  result, state = train.train(cfg, progress_bar=False, devices=jax.devices()[:devices])
  assert result["step"] == 1 and np.isfinite(result["val_loss"])
  micro, accum = stated.train.micro_batches(devices)
  start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gptjax:"))
  assert (f"{devices} cpu devices, {stated.tokens_per_step} tokens/step ({stated.train.batch_size} x "
          f"{stated.model.block_size}: {accum} micro-step{'s' if accum > 1 else ''} of "
          f"{micro // devices} per device)") in start
  table = state.params["h"]["mlp"]["c_fc"]["kernel"]  # [layers, embed, mlp]
  per_device = table.sharding.shard_shape(table.shape)
  assert per_device[1] == (32 // devices if name in FSDP_BY_DEFAULT else 32)  # embed over fsdp: every device
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == table.shape]
  assert len(moments) == 2 and all(x.sharding == table.sharding for x in moments)  # AdamW's, placed the same


@pytest.mark.parametrize("name", [pytest.param("gpt2_124m", marks=pytest.mark.slow), "llama3_2_1b"])  # data parallel, FSDP
def test_named_configs_start_on_8_devices_with_the_tokens_per_step_they_state(name, tmp_path, char_data, capsys):
  _start_named(name, 8, tmp_path, char_data, capsys)


# 10 runs of 0.5M-token steps (smollm2's takes 80 s); 8 devices above in the default run, and every
# named config's split on 1, 2, 4 and 8 devices in test_config.
@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_named_configs_start_on_1_2_4_and_8_devices(name, devices, tmp_path, char_data, capsys):
  if devices == 8 and name != "smollm2_135m":
    pytest.skip("in the default run")
  _start_named(name, devices, tmp_path, char_data, capsys)


@pytest.mark.slow  # the suite's time: kill -9 and SIGTERM resume exactly below, with dropout and accumulation
def test_resume_continues_exactly(tmp_path, char_data):
  """8 steps straight == 4 steps, stop, --resume, 4 more: same losses, same parameters, bit for bit."""
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4",
            "model.dropout=0.1", "train.grad_accum_steps=2"]
  straight, _ = train.train(tiny_config(tmp_path / "a", *common, "train.max_iters=8"),
                         progress_bar=False, devices=jax.devices()[:1])
  train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=4"), progress_bar=False, devices=jax.devices()[:1])
  resumed, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                        progress_bar=False, devices=jax.devices()[:1])
  assert resumed == straight
  learned = lambda out: [{k: v for k, v in row.items() if k not in ("tokens_per_s", "time")}  # noqa: E731
                         for row in record.read_rows(out) if row["kind"] in ("train", "eval")]
  split_run = learned(tmp_path / "b" / "out")  # the record holds both parts, and the first part's last log line
  assert [row for row in split_run if row["step"] != 4 or row["kind"] == "eval"] == learned(tmp_path / "a" / "out")
  assert (tmp_path / "b" / "out" / "loss.png").is_file()
  finished, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                         progress_bar=False, devices=jax.devices()[:1])
  assert finished == straight  # resuming a finished run trains nothing and reports its losses
  a, b = _final_params(tmp_path / "a" / "out"), _final_params(tmp_path / "b" / "out")
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # the suite's time; an old config reads as random order in test_data
def test_a_checkpoint_from_before_data_order_resumes_its_random_draws_exactly(tmp_path, char_data, monkeypatch):
  """A run saved before data.order existed drew windows at random; resumed with today's defaults
  (auto: shuffled for one folder), it goes on drawing them as before."""
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4"]
  straight, _ = train.train(tiny_config(tmp_path / "a", *common, "data.order=random", "train.max_iters=8"),
                            progress_bar=False, devices=jax.devices()[:1])
  to_dict = config_lib.to_dict
  with monkeypatch.context() as m:
    def without_order(cfg):
      values = to_dict(cfg)
      del values["data"]["order"]
      return values
    m.setattr(checkpoint.config_lib, "to_dict", without_order)
    train.train(tiny_config(tmp_path / "b", *common, "data.order=random", "train.max_iters=4"),
                progress_bar=False, devices=jax.devices()[:1])
  resumed, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                           progress_bar=False, devices=jax.devices()[:1])
  assert resumed == straight
  shuffled, _ = train.train(tiny_config(tmp_path / "c", *common, "train.max_iters=8"),
                            progress_bar=False, devices=jax.devices()[:1])
  assert shuffled["val_loss"] != straight["val_loss"]  # today's default is another stream


def test_profile_traces_the_steps_asked_for(tmp_path, char_data, capsys):
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=6", "train.profile=2:4")
  train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  output = capsys.readouterr().out
  assert "profile of steps 3-4 written to " + str(tmp_path / "out" / "profile") in output
  assert re.search(r"most of the time: (forward|backward) \w+ \d+%", output)
  assert len(profile.trace_files(tmp_path / "out" / "profile")) == 1
  table = json.loads((tmp_path / "out" / "profile" / "summary.json").read_text())  # named from the run's own step
  names = [name for name, _, _ in table]
  assert {"forward dot_general", "backward dot_general"} <= set(names)
  assert sum(share for _, _, share in table) == pytest.approx(1.0)
  assert f"most of the time: {table[0][0]} {table[0][2]:.0%}" in output  # the log line is the table's head


@pytest.mark.slow  # 23 s; resume across meshes and exact resume stay in the default run
def test_resume_may_change_how_the_blocks_run(tmp_path, char_data):
  """Scanning, remat and the attention implementation compute the same values: a run may resume with them changed."""
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4"]
  straight, _ = train.train(tiny_config(tmp_path / "a", *common, "train.max_iters=8"),
                            progress_bar=False, devices=jax.devices()[:1])
  train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=4"), progress_bar=False, devices=jax.devices()[:1])
  resumed, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8", "model.scan_layers=true",
                                       "model.remat=save_dots", "model.attention=xla"), resume=True,
                           progress_bar=False, devices=jax.devices()[:1])
  assert resumed["step"] == 8
  assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)
  assert load_checkpoint(tmp_path / "b" / "out", "latest")[0].model.scan_layers  # the run's config records it


@pytest.mark.parametrize("signum, seed", [pytest.param(signal.SIGTERM, 0, marks=pytest.mark.slow),  # the suite's time:
                                          pytest.param(signal.SIGTERM, 1, marks=pytest.mark.slow),  # SIGTERM's resume is
                                          (signal.SIGKILL, 2)])  # test_sigterm_saves_before_any_evaluation's too
def test_stopped_at_a_random_step_then_resumed_exactly(tmp_path, char_data, signum, seed):
  """SIGTERM at a random step: that step is saved, the exit is 0, and --resume ends where an
  uninterrupted run ends, bit for bit. kill -9: --resume starts from the last checkpoint (taking
  over the dead trainer's lock) and ends the same."""
  args = ["train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", "train.max_iters=40", "train.log_interval=1",
                                                 "train.checkpoint_interval=8", "train.eval_interval=8", "model.dropout=0.1",
                                                 "train.grad_accum_steps=2"),
          "--no-progress"]
  straight = run_cli(*args, f"train.out_dir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr

  stop_at = random.Random(seed).randrange(2, 30)
  process = start_cli(*args, f"train.out_dir={tmp_path / 'stopped'}")
  for line in process.stdout:
    if line.startswith(f"step {stop_at}: loss"):
      while signum == signal.SIGKILL and not (tmp_path / "stopped" / "checkpoints" / "8").is_dir():
        time.sleep(0.01)  # a checkpoint to resume from (it is written in the background)
      process.send_signal(signum)
      break
  stdout, stderr = process.communicate(timeout=300)
  if signum == signal.SIGTERM:
    assert process.returncode == 0, stderr
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+), saved in", stdout).group(1))
    assert stop_at <= stopped < 40 and "continue with: gptjax train shakespeare_char_cpu" in stdout
    assert load_checkpoint(tmp_path / "stopped", "latest")[3] == stopped
  else:
    assert process.returncode == -signal.SIGKILL and (tmp_path / "stopped" / "gptjax.lock").exists()
    assert load_checkpoint(tmp_path / "stopped", "latest")[3] % 8 == 0

  resumed = run_cli(*args, f"train.out_dir={tmp_path / 'stopped'}", "--resume")
  assert resumed.returncode == 0, resumed.stderr
  done = [r.stdout.strip().splitlines()[-1] for r in (straight, resumed)]
  assert done[0].startswith("done: step 40") and done[0] == done[1]
  a, b = (_final_params(tmp_path / name) for name in ("straight", "stopped"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_second_signal_exits_at_once_leaving_the_checkpoints_intact(tmp_path, char_data):
  out = tmp_path / "out"
  process = start_cli("train", "shakespeare_char_cpu", *tiny(
      f"data.dir={char_data}", f"train.out_dir={out}", "train.max_iters=5000", "train.log_interval=1",
      "train.checkpoint_interval=4", "train.eval_interval=4"), "--no-progress")
  for line in process.stdout:
    if line.startswith("step 9: loss"):
      process.send_signal(signal.SIGTERM)
      process.send_signal(signal.SIGINT)  # not a second SIGTERM: two of one kind may arrive as one
      break
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT) and "stopped by" not in stdout and not stderr.strip(), stderr
  manager = checkpoint.open_manager(str(out), create=False)
  for step in manager.all_steps():  # whatever was finished is whole; nothing half-written counts
    assert load_checkpoint(out, str(step))[3] == step
  manager.close()


def test_time_based_checkpoints(tmp_path, char_data):
  """train.checkpoint_minutes: a save at the first log step after that long (here: at every one),
  unranked: nothing is evaluated for it, and it is never the best."""
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=20", "train.log_interval=5",
                    "train.checkpoint_interval=1000", "train.eval_interval=1000", "train.keep_checkpoints=10",
                    "train.checkpoint_minutes=1e-6")
  train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  manager = checkpoint.open_manager(str(tmp_path / "out"), create=False)
  assert manager.all_steps() == [5, 10, 15, 20]
  assert [manager.metrics(step) is None for step in (5, 10, 15, 20)] == [True, True, True, False]
  assert manager.best_step() == 20  # the end of the run is evaluated
  assert [row["step"] for row in record.read_rows(tmp_path / "out") if row["kind"] == "eval"] == [20]
  manager.close()


def test_sigterm_saves_before_any_evaluation_and_the_step_is_ranked_once_resumed(tmp_path, char_data, monkeypatch):
  """A preemption's save comes first: no evaluation batch runs between the signal and the save. The
  step is unranked (never the best, not deleted while among the latest) until the resumed run
  evaluates it; the resumed run ends as an uninterrupted one does."""
  events = []
  compile_steps = steps_lib.compile_steps

  def counting_eval_batches(*args):
    steps = compile_steps(*args)
    return dataclasses.replace(steps, eval=lambda *a: (events.append("eval batch"), steps.eval(*a))[1])

  save = checkpoint.save
  monkeypatch.setattr(steps_lib, "compile_steps", counting_eval_batches)
  monkeypatch.setattr(checkpoint, "save", lambda manager, step, **kw: (events.append(f"save {step}"),
                                                                         save(manager, step, **kw))[1])
  on_signal = hooks.SaveOnSignal.__call__

  def preempted_at_step_6(self, step, state, step_metrics):
    if step == 6 and self.received is None:
      events.append("SIGTERM")
      signal.raise_signal(signal.SIGTERM)  # handled by the run's handler before the call below
    return on_signal(self, step, state, step_metrics)

  monkeypatch.setattr(hooks.SaveOnSignal, "__call__", preempted_at_step_6)
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4", "train.eval_iters=3",
            "train.keep_checkpoints=1", "model.dropout=0.1"]
  devices = jax.devices()[:1]
  stopped, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=10"), progress_bar=False, devices=devices)
  assert stopped["step"] == 6 and "stopped by SIGTERM at step 6" in stopped["stopped"]
  assert events[events.index("SIGTERM"):] == ["SIGTERM", "save 6"]  # no evaluation batch between them
  assert events[:events.index("SIGTERM")].count("eval batch") == 2 * 3  # step 4's evaluation: 3 batches per split
  manager = checkpoint.open_manager(str(tmp_path / "b" / "out"), create=False)
  assert manager.all_steps() == [4, 6] and manager.metrics(6) is None and manager.best_step() == 4
  manager.close()

  monkeypatch.setattr(hooks.SaveOnSignal, "__call__", on_signal)
  events.clear()
  ranked, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=6"), resume=True,
                          progress_bar=False, devices=devices)  # nothing left to train: step 6 is evaluated, ranked
  assert events == ["eval batch"] * 6 and ranked["step"] == 6
  manager = checkpoint.open_manager(str(tmp_path / "b" / "out"), create=False)
  assert manager.metrics(6) == {"val_loss": ranked["val_loss"]}
  assert manager.best_step() == min((4, 6), key=lambda step: manager.metrics(step)["val_loss"])
  manager.close()
  resumed, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=10"), resume=True,
                           progress_bar=False, devices=devices)
  straight, _ = train.train(tiny_config(tmp_path / "a", *common, "train.max_iters=10"), progress_bar=False,
                            devices=devices)
  assert resumed == straight
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "a" / "out"), _final_params(tmp_path / "b" / "out"))


def test_a_second_trainer_on_the_same_run_is_refused(tmp_path, char_data):
  """While a run trains, a second `gptjax train` of it is refused; the lock goes with the first (a
  lock left by a dead trainer is taken over: the kill -9 resume above)."""
  def args(max_iters):
    return ["train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.out_dir={tmp_path}", "train.log_interval=1",
                                                   f"train.max_iters={max_iters}", "train.checkpoint_interval=5000"), "--no-progress"]

  first = start_cli(*args(5000))
  for line in first.stdout:
    if line.startswith("step 3: loss"):
      break
  second = run_cli(*args(5000))  # no checkpoint yet: only the lock tells that the run is taken
  one_line_error(second, f"{tmp_path} is being trained by another gptjax (host {socket.gethostname()}, pid {first.pid})")
  first.send_signal(signal.SIGTERM)
  stdout, stderr = first.communicate(timeout=300)
  assert first.returncode == 0 and "stopped by SIGTERM" in stdout, stderr
  assert not (tmp_path / "gptjax.lock").exists()  # released when it stopped


@pytest.mark.parametrize("log, save", [(1, 1), pytest.param(10, 1, marks=pytest.mark.slow),  # (1, 1) covers skip and stop
                                       pytest.param(2, 3, marks=pytest.mark.slow)])
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, char_data, log, save):
  """A learning rate of 1e9 makes the loss NaN from step 3 on: those updates are skipped, the run
  stops after train.max_bad_steps of them, and every checkpoint holds finite parameters."""
  out = tmp_path / "out"
  before = digest(char_data)
  result = run_cli("train", "shakespeare_char_cpu", *tiny(
      f"data.dir={char_data}", f"train.out_dir={out}", "optim.learning_rate=1e9", "optim.min_lr=0", "optim.grad_clip=0",
      "train.max_bad_steps=3", f"train.log_interval={log}", f"train.checkpoint_interval={save}",
      f"train.eval_interval={save}"), "--no-progress")
  one_line_error(result, "not finite for", "steps in a row, from step 3 (train.max_bad_steps=3)",
                 "lower optim.learning_rate")
  assert "skipped 1 non-finite steps so far" in result.stdout or log > 1
  manager = checkpoint.open_manager(str(out), create=False)
  assert manager.all_steps()
  for step in manager.all_steps():
    params = checkpoint.load_for_inference(str(out), str(step))[2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params))), step
  if save == 1:  # step 1 (a learning rate of 0) is the one finite validation loss: it is the best, and kept
    assert manager.best_step() == 1
  manager.close()
  assert digest(char_data) == before
  sampled = run_cli("sample", "--checkpoint", out, "--max-new-tokens", 5, "--num-samples", 1)
  assert sampled.returncode == 0, sampled.stderr
