"""Parallelism as mesh shapes on 8 simulated CPU devices: the same losses and parameters as one
device, parameters placed as the rules say, checkpoints that move between meshes, two processes."""

import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import cli
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import sources
from gptjax import train
from gptjax.errors import UserError

from conftest import digest, load_checkpoint, one_line_error, run_cli, tiny, tiny_config

# 8 heads so that tensor=8 splits them; the 77-character vocabulary divides no tensor size > 1.
SHORT_RUN = ["model.n_head=8", "train.max_iters=4", "train.eval_interval=4", "train.checkpoint_interval=4",
             "model.dropout=0.1", "train.batch_size=16", "train.grad_accum_steps=2"]


def _mesh_overrides(mesh):
  return [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"]


def _assert_same_run(result, state, reference, reference_state):
  assert result["step"] == reference["step"]
  assert result["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
  assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5),
               jax.device_get(state.params), jax.device_get(reference_state.params))


def _expected_specs(tensor: int) -> dict[str, tuple]:
  """The rules written out for the tiny model (vocab 77, embd 32, 8 heads of 4, MLP 128)."""
  vocab = "tensor" if 77 % tensor == 0 else None
  embed_1d = ("fsdp",)
  return {
      "wte/embedding": (vocab, "fsdp"), "wpe/embedding": (None, "fsdp"),
      "ln_1/scale": embed_1d, "ln_1/bias": embed_1d, "ln_2/scale": embed_1d, "ln_2/bias": embed_1d,
      "ln_f/scale": embed_1d, "ln_f/bias": embed_1d,
      "attn/c_attn/kernel": ("fsdp", None, "tensor", None), "attn/c_attn/bias": (None, "tensor", None),
      "attn/c_proj/kernel": ("tensor", None, "fsdp"), "attn/c_proj/bias": embed_1d,
      "mlp/c_fc/kernel": ("fsdp", "tensor"), "mlp/c_fc/bias": ("tensor",),
      "mlp/c_proj/kernel": ("tensor", "fsdp"), "mlp/c_proj/bias": embed_1d,
  }


def _assert_placed_by_rules(state, mesh):
  expected = _expected_specs(mesh[2])
  by_shape = {}
  for path, leaf in traverse_util.flatten_dict(state.params, sep="/").items():
    stacked = path.startswith("h/")  # the blocks' parameters have a leading layer axis, not split
    spec = (None, *expected[path[2:]]) if stacked else expected[path]
    sizes = leaf.sharding.mesh.shape
    assert (sizes["data"], sizes["fsdp"], sizes["tensor"], sizes["expert"]) == (*mesh, 1)
    assert leaf.sharding.is_equivalent_to(NamedSharding(leaf.sharding.mesh, P(*spec)), leaf.ndim), \
        (path, leaf.sharding.spec)
    by_shape[leaf.shape] = leaf.sharding
  for leaf in jax.tree.leaves(state.opt_state):  # Adam's moments sit where their parameters do
    if leaf.ndim:
      assert leaf.sharding.is_equivalent_to(by_shape[leaf.shape], leaf.ndim)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, char_data):
  path = tmp_path_factory.mktemp("one_device")
  return train.train(tiny_config(path, f"data.dir={char_data}", *SHORT_RUN), progress_bar=False,
                     devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [pytest.param((8, 1, 1), marks=pytest.mark.slow), pytest.param((1, 8, 1), marks=pytest.mark.slow),
                                  pytest.param((2, 2, 2), marks=pytest.mark.slow),  # the suite's time: GPT-2 on
                                  pytest.param((1, 1, 8), marks=pytest.mark.slow)], ids=str)  # (2,2,2) resumes below
def test_mesh_shapes_match_one_device(tmp_path, char_data, one_device_run, mesh, capsys):
  result, state = train.train(tiny_config(tmp_path, f"data.dir={char_data}", *SHORT_RUN, *_mesh_overrides(mesh)),
                              progress_bar=False)
  _assert_same_run(result, state, *one_device_run)
  _assert_placed_by_rules(state, mesh)

  # The memory report counts what one device really holds.
  held = sum(shard.data.nbytes for leaf in jax.tree.leaves(state.params) for shard in leaf.addressable_shards
             if shard.device == jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  assert sharding.bytes_per_device(abstract, jax.tree.map(lambda x: x.sharding, state.params)) == held
  assert "memory per device: parameters" in capsys.readouterr().out


# The Llama / Qwen options at once: 2 key/value heads (split by tensor=2, whole on tensor=8), the
# vocabulary padded to 80 (which tensor=8 divides), an untied head, SwiGLU, RMSNorm on queries and keys.
LLAMA_STYLE = ["model.positions=rope", "model.n_kv_head=2", "model.norm=rmsnorm", "model.mlp=swiglu", "model.mlp_hidden=96",
               "model.bias=false", "model.qkv_bias=true", "model.qk_norm=true", "model.tie_embeddings=false",
               "model.vocab_multiple=8"]


def _expected_llama_specs(tensor: int) -> dict[str, tuple]:
  vocab, kv_heads = "tensor" if 80 % tensor == 0 else None, "tensor" if 2 % tensor == 0 else None
  return {
      "wte/embedding": (vocab, "fsdp"), "lm_head/kernel": ("fsdp", vocab),
      "ln_1/scale": ("fsdp",), "ln_2/scale": ("fsdp",), "ln_f/scale": ("fsdp",),
      "attn/q_attn/kernel": ("fsdp", "tensor", None), "attn/q_attn/bias": ("tensor", None),
      "attn/kv_attn/kernel": ("fsdp", None, kv_heads, None), "attn/kv_attn/bias": (None, kv_heads, None),
      "attn/q_norm/scale": (None,), "attn/k_norm/scale": (None,), "attn/c_proj/kernel": ("tensor", None, "fsdp"),
      "mlp/c_fc/kernel": ("fsdp", None, "tensor"), "mlp/c_proj/kernel": ("tensor", "fsdp"),
  }


# The suite's time: a Llama-style model (GQA, rotary, SwiGLU) on meshes stays in the default run
# as the mixture of experts' dense twin (test_moe: fsdp 2 x expert 2 x tensor 2 against one device).
@pytest.mark.parametrize("mesh", [pytest.param((2, 2, 2), marks=pytest.mark.slow),
                                  pytest.param((1, 1, 8), marks=pytest.mark.slow)], ids=str)
def test_the_llama_style_model_on_meshes_matches_one_device(tmp_path, char_data, mesh):
  def run(name, devices, *overrides):
    return train.train(tiny_config(tmp_path / name, f"data.dir={char_data}", *SHORT_RUN, *LLAMA_STYLE, *overrides),
                       progress_bar=False, devices=devices)

  on_mesh = run("mesh", None, *_mesh_overrides(mesh))
  _assert_same_run(*on_mesh, *run("one", jax.devices()[:1]))
  state = on_mesh[1]
  expected = _expected_llama_specs(mesh[2])
  for path, leaf in traverse_util.flatten_dict(state.params, sep="/").items():
    spec = (None, *expected[path[2:]]) if path.startswith("h/") else expected[path]
    assert leaf.sharding.is_equivalent_to(NamedSharding(leaf.sharding.mesh, P(*spec)), leaf.ndim), (path, leaf.sharding.spec)


def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path, char_data):
  def config(name, mesh, max_iters):
    return tiny_config(tmp_path / name, f"data.dir={char_data}", *SHORT_RUN, *_mesh_overrides(mesh),
                       f"train.max_iters={max_iters}")

  straight = train.train(config("straight", (8, 1, 1), 8), progress_bar=False)
  train.train(config("moved", (8, 1, 1), 4), progress_bar=False)
  resumed = train.train(config("moved", (2, 2, 2), 8), resume=True, progress_bar=False)
  _assert_same_run(*resumed, *straight)
  _assert_placed_by_rules(resumed[1], (2, 2, 2))


def test_batch_that_the_mesh_does_not_divide(tmp_path, char_data):
  before = digest(char_data)
  with pytest.raises(UserError, match=r"train.batch_size=12 is not divisible by data\*fsdp\*expert=8"):
    train.train(tiny_config(tmp_path, f"data.dir={char_data}", "train.batch_size=12"), progress_bar=False)
  assert not (tmp_path / "out").exists() and digest(char_data) == before


def _start_two_processes(out_dir, overrides, *flags) -> list[subprocess.Popen]:
  """`gptjax train` as two local processes of 4 CPU devices each, joined by jax.distributed (CPU
  collectives over gloo)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "gptjax.cli", "train", "shakespeare_char_cpu", *overrides,
             f"train.out_dir={out_dir}", f"distributed.coordinator_address=localhost:{port}",
             "distributed.num_processes=2", "--no-progress", *flags]
  return [subprocess.Popen(command + [f"distributed.process_id={i}"], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]


def _finish(processes) -> list[str]:
  """Each process's stdout, once all have exited 0."""
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return [stdout for stdout, _ in outputs]


def test_two_processes_train_like_one(tmp_path, char_data):
  """Two processes of 4 devices against one process of 8 devices with the same global batch."""
  overrides = tiny(f"data.dir={char_data}", *SHORT_RUN, *_mesh_overrides((2, 2, 2)))
  outputs = _finish(_start_two_processes(tmp_path / "two", overrides))

  one, one_state = train.train(tiny_config(tmp_path / "one", f"data.dir={char_data}", *SHORT_RUN,
                                           *_mesh_overrides((2, 2, 2))), progress_bar=False)
  assert "8 cpu devices" in outputs[0]
  assert f"done: step 4, train loss {one['train_loss']:.4f}, val loss {one['val_loss']:.4f}" in outputs[0]
  # Only process 0 logs. (Gloo's own connection messages, printed by both processes from several
  # threads, can interleave mid-line, so look for gptjax's lines rather than for an empty stdout.)
  for gptjax_line in ("gptjax:", "memory per device", "step 4:", "done:"):
    assert gptjax_line in outputs[0] and gptjax_line not in outputs[1], gptjax_line
  two_params = load_checkpoint(str(tmp_path / "two"), "latest")[2]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5),
               jax.device_get(two_params), jax.device_get(one_state.params))


@pytest.mark.slow
def test_two_processes_agree_on_the_step_to_save_when_one_is_preempted(tmp_path, char_data):
  """SIGTERM to process 1 alone (which logs nothing): JAX's preemption service has both processes
  save the same step and exit 0; --resume on both then finishes the run."""
  overrides = tiny(f"data.dir={char_data}", "train.max_iters=100000", "train.log_interval=1",
                   "train.checkpoint_interval=100000", "train.eval_interval=100000")
  processes = _start_two_processes(tmp_path, overrides)
  for line in processes[0].stdout:
    if line.startswith("step 3: loss"):
      processes[1].send_signal(signal.SIGTERM)
      break
  stdout = _finish(processes)[0]
  stopped = int(re.search(r"stopped by a preemption notice at step (\d+), saved in", stdout).group(1))
  assert 3 <= stopped < 100000 and load_checkpoint(tmp_path, "latest")[3] == stopped
  overrides = tiny(*overrides, f"train.max_iters={stopped + 2}")
  assert f"done: step {stopped + 2}" in _finish(_start_two_processes(tmp_path, overrides, "--resume"))[0]
  assert load_checkpoint(tmp_path, "latest")[3] == stopped + 2


def _in_process(capsys, *args):
  """`gptjax ARGS` in this process, which has 8 simulated devices; returns its stdout."""
  cli.main([*map(str, args)])
  return capsys.readouterr().out


@pytest.mark.parametrize("mesh", [["mesh.fsdp=8"], pytest.param(["mesh.tensor=2", "mesh.data=4"], marks=pytest.mark.slow)],
                         ids=" ".join)
def test_sample_and_perplexity_on_a_mesh_match_one_device(tiny_run, capsys, mesh, tmp_path):
  out_dir, _ = tiny_run
  for sample_args in (["--temperature", "0"], ["--temperature", "0.8", "--seed", "5"]):
    args = ["sample", "--checkpoint", out_dir, "--prompt", "ROMEO:", "--num-samples", 3, "--max-new-tokens", 40,
            *sample_args]
    one_device = run_cli(*args)  # a subprocess sees this machine's one CPU device
    assert one_device.returncode == 0, one_device.stderr
    assert _in_process(capsys, *args, *mesh) == one_device.stdout

  (tmp_path / "text.txt").write_text(sources.read_text(sources.BUILTIN_SHAKESPEARE)[-3000:])  # 187 windows
  args = ["perplexity", "--checkpoint", out_dir, "--text", tmp_path / "text.txt", "--batch-size", 6]
  one_device = run_cli(*args)
  assert one_device.returncode == 0, one_device.stderr
  nll = [float(re.search(r"mean NLL ([\d.]+)", out).group(1)) for out in (one_device.stdout, _in_process(capsys, *args, *mesh))]
  assert nll[1] == pytest.approx(nll[0], rel=1e-5), nll


def test_inference_accepts_mesh_overrides_only(tiny_run):
  out_dir, _ = tiny_run
  one_line_error(run_cli("sample", "--checkpoint", out_dir, "model.n_layer=3"), "only mesh.* overrides apply here")
  one_line_error(run_cli("perplexity", "--checkpoint", out_dir, "--split", "val", "mesh.fsdp=3"),
                 "mesh data=-1 x fsdp=3 x expert=1 x tensor=1 does not divide the 1 devices")


def test_a_parameter_the_mesh_cannot_split_is_named_with_what_would_split_it():
  cfg = config_lib.load_config("smollm2_135m", ["model.vocab_size=49152", "mesh.tensor=2"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
  lines = sharding.unsplit_report(*model_lib.abstract_params(cfg.model), mesh)
  assert ("not split: h/attn/q_attn/kernel [30, 576, 9, 64]: heads 9 over tensor=2 does not divide, so this "
          "dimension is replicated; model.n_head a multiple of 2 would split it") in lines
  assert any(line.startswith("not split: h/attn/kv_attn/kernel") and "model.n_kv_head a multiple of 2" in line
             for line in lines)
  assert not any("wte" in line or "mlp" in line for line in lines)  # 49152 padded to 128s and 1536 divide
  gpt2 = config_lib.load_config("gpt2_124m", ["mesh.data=1", "mesh.tensor=8"])
  lines = sharding.unsplit_report(*model_lib.abstract_params(gpt2.model), sharding.make_mesh(gpt2.mesh, jax.devices()[:8]))
  assert any("wte/embedding [50257, 768]: vocab 50257 over tensor=8" in line and "model.vocab_multiple a multiple of 8"
             in line for line in lines)
