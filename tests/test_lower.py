"""Steps lowered for GPUs and TPUs on this CPU, over an 8-device mesh: which kernels they call, the
dtypes of their matmuls, and the parameters' shardings in the module (`gptjax lower`)."""

import re

import jax
import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import lower
from gptjax import model as model_lib
from gptjax import sharding

from conftest import one_line_error, run_cli

SMALL = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128", "model.vocab_size=1000",
         "train.batch_size=8", "train.device_batch_size=0", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
         "model.scan_layers=false"]  # each layer's kernels in the module (scanned, one loop body holds them)
GPT2 = ("gpt2_124m", SMALL)
LLAMA = ("llama3_2_1b", [*SMALL, "model.n_kv_head=2", "model.head_dim=32", "model.mlp_hidden=256"])
# grouped-query heads, rotary positions, a padded vocabulary
CONFIGS = {"gpt2": GPT2, "llama": LLAMA}


def _lowered(tmp_path, which, platform, *extra):
  name, overrides = CONFIGS[which]
  cfg = config_lib.load_config(name, [*overrides, *extra])
  return cfg, lower.lower(cfg, platform, jax.devices()[:8], str(tmp_path / "lowered"), partition=False)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_the_bf16_step_lowered_for_cuda_calls_cudnns_fused_attention_forward_and_backward(tmp_path, which):
  cfg, lowered = _lowered(tmp_path, which, "cuda")
  assert lowered["attention"] == "attention: cudnn (auto on cuda); matmuls in bfloat16"
  train, prefill = lowered["texts"]["train_step"], lowered["texts"]["prefill"]
  layers = cfg.model.n_layer
  forward = layers * (2 if cfg.model.remat != "none" else 1)  # llama3_2_1b's remat=save_dots runs it again for the gradient
  assert lower.custom_calls(train) == {"__cudnn$fmhaSoftmax": forward, "__cudnn$fmhaSoftmaxBackward": layers}
  assert lower.custom_calls(prefill) == {"__cudnn$fmhaSoftmax": layers}
  assert lower.square_softmaxes(train, 128) == lower.square_softmaxes(prefill, 128) == 0
  assert (tmp_path / "lowered" / "train_step.mlir").read_text() == train


@pytest.mark.parametrize("which", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])  # the suite's time
def test_the_step_lowered_for_tpu_calls_splash_attention(tmp_path, which):
  _, lowered = _lowered(tmp_path, which, "tpu")
  assert lowered["attention"].startswith("attention: splash (auto on tpu)")
  calls = lower.custom_calls(lowered["texts"]["train_step"])
  # forward (keeping the softmax statistics), and the gradient's dq and dk/dv kernels; a kernel
  # called from several layers may be one function in the module, so only their kinds are counted
  assert set(calls) == {"splash_mha_fwd_residuals", "splash_mha_dq_no_residuals", "splash_mha_dkv_no_residuals"}, calls
  assert lower.square_softmaxes(lowered["texts"]["train_step"], 128) == 0


def test_the_float32_step_lowered_for_cuda_takes_xlas_path_and_says_why(tmp_path):
  _, lowered = _lowered(tmp_path, "gpt2", "cuda", "model.dtype=float32")
  assert lowered["attention"] == ("attention: xla (auto on cuda: cuDNN's fused attention takes bfloat16 or float16, "
                                  "not float32 (set model.dtype=bfloat16)); matmuls in float32")
  train = lowered["texts"]["train_step"]
  assert not lower.custom_calls(train) and lower.square_softmaxes(train, 128) > 0


def test_the_lm_head_and_loss_are_float32_in_the_bf16_step(tmp_path):
  cfg, lowered = _lowered(tmp_path, "llama", "cuda")
  train, V = lowered["texts"]["train_step"], cfg.model.padded_vocab
  assert V == 1024  # the vocabulary padded to a multiple of 128
  head = re.findall(rf"stablehlo\.dot_general [^\n]*: \(tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\) -> tensor<8x128x{V}x(\w+)>", train)
  assert head == ["f32"]  # the head's matmul: bf16 inputs, float32 logits
  assert not re.search(rf"tensor<[0-9x]*x{V}xf32>, tensor<[0-9x]*xf32>\) -> ", train)  # its gradient's matmuls are not float32
  assert re.search(rf"stablehlo\.exponential [^\n]*tensor<8x128x{V}xf32>", train)  # the softmax of the loss
  assert not re.search(rf"stablehlo\.exponential [^\n]*tensor<8x128x{V}xbf16>", train)
  assert lower.matmul_dtypes(train)["bf16 x bf16 -> bf16"] > 0


@pytest.mark.parametrize("which", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])  # the suite's time
def test_parameters_carry_the_rules_tables_shardings_in_the_lowered_module(tmp_path, which):
  cfg, lowered = _lowered(tmp_path, which, "cuda")
  shapes, names = model_lib.abstract_params(cfg.model)
  expected = jax.tree.leaves(sharding.param_shardings(shapes, names, lowered["mesh"]))
  arguments = lower.argument_shardings(lowered["texts"]["train_step"])
  found = arguments[1:1 + len(expected)]  # the state's step first, then its parameters
  for sharding_, in_module, (name, shape, _) in zip(expected, found, lowered["params"]):
    spec = tuple(sharding_.spec) + (None,) * (len(shape) - len(sharding_.spec))
    assert in_module == tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec), name
  assert sum(1 for spec in found if any(spec)) >= len(found) - 2  # nearly all split: FSDP and tensor axes apply


def test_gptjax_lower_prints_what_a_user_acts_on(tmp_path):
  result = run_cli("lower", "llama3_2_1b", "--platform", "cuda", "--devices", 8, *LLAMA[1], "--out", tmp_path / "out")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "gptjax lower: cuda, 8 devices, mesh {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}"
  assert lines[1] == "attention: cudnn (auto on cuda); matmuls in bfloat16"
  train_row = next(line for line in lines if line.startswith("| train_step"))
  assert "__cudnn$fmhaSoftmax x4, __cudnn$fmhaSoftmaxBackward x2 | 0 | bf16 x bf16 -> bf16" in train_row
  collectives = train_row.split("|")[-2]
  assert "all-gather" in collectives and "all-reduce" in collectives  # FSDP's gathers, data parallelism's sums
  assert any(re.fullmatch(r"  h/attn/q_attn/kernel +\[2, 128, 4, 32\]  \(None, 'fsdp', 'tensor', None\)", line)
             for line in lines)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["decode.mlir", "prefill.mlir", "train_step.mlir"]


@pytest.mark.parametrize("platform, expert, tensor", [("cuda", 4, 2), ("tpu", 8, 1)])
def test_an_8_expert_step_lowers_to_grouped_matmuls_on_each_devices_experts(tmp_path, platform, expert, tensor):
  """moe_shakespeare_cpu (8 experts of 192, k = 2) over mesh.expert x mesh.tensor = 8: the experts run
  as grouped matmuls (chlo.ragged_dot) on this device's experts only, the tokens all-gathered and the
  outputs reduce-scattered within each expert group, and no dense matmul takes an expert's weights."""
  cfg = config_lib.load_config("moe_shakespeare_cpu", ["model.vocab_size=65", "train.batch_size=16", "mesh.data=1",
                                                       f"mesh.expert={expert}", f"mesh.tensor={tensor}"])
  lowered = lower.lower(cfg, platform, jax.devices()[:8], str(tmp_path), partition=False)
  train = lowered["texts"]["train_step"]
  local_fc, local_proj = f"{8 // expert}x128x{2 * 192 // tensor}xbf16", f"{8 // expert}x{192 // tensor}x128xbf16"
  rows = 16 * 64 * 2  # an expert group's choices (one group holds the whole batch here): tokens x k
  grouped = lower.grouped_matmuls(train)
  # the layers are one scanned body: two grouped matmuls forward, each one's two gradients backward
  assert len(grouped) == 6 and all(lhs.startswith(f"{rows}x") for lhs, _ in grouped), grouped
  assert sum(rhs in (local_fc, local_proj) for _, rhs in grouped) == 4  # forward and input gradients: own experts only
  assert not [line for line in train.splitlines() if "stablehlo.dot_general" in line
              and (local_fc in line or local_proj in line)]  # no dense tokens x experts compute
  group = str(np.arange(8).reshape(expert, tensor).T.tolist())  # each expert group's places in the mesh
  exchanges = lower.module_collectives(train)
  assert exchanges[("all_gather", group)] >= 3 and exchanges[("reduce_scatter", group)] >= 1
  assert ("all_to_all", group) not in exchanges


def test_cudnn_in_float32_is_one_line_naming_what_to_change():
  one_line_error(run_cli("lower", "gpt2_124m", "--platform", "cuda", *SMALL, "model.attention=cudnn",
                         "model.dtype=float32"),
                 "model.attention=cudnn cannot run here: cuDNN's fused attention takes bfloat16 or float16, "
                 "not float32 (set model.dtype=bfloat16)")
