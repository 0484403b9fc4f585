"""The Llama / Qwen family against transformers (torch, CPU): LlamaForCausalLM with grouped-query
attention and Llama 3 rope scaling, Qwen2ForCausalLM (q/k/v biases) and Qwen3ForCausalLM (per-head
query/key RMSNorm, a head size of its own). No network: random-weight models saved with
`save_pretrained`, and a BPE tokenizer.json trained here on the built-in Shakespeare."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from gptjax import config as config_lib
from gptjax import convert
from gptjax import data
from gptjax import evaluate
from gptjax import hf_llama
from gptjax import metrics
from gptjax import model as model_lib
from gptjax import sample
from gptjax import tokenizer as tokenizer_lib
from gptjax import sources
from gptjax import prepare
from gptjax.errors import UserError

from conftest import (digest, gptjax_logits, hf_logits, load_checkpoint, one_line_error, run_cli,
                      transformers_sliding_window_nll)

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=32)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        tie_word_embeddings=True, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        norm_topk_prob=False, mlp_only_layers=[0])),  # a dense layer before the sparse one
}
TEXTS = ["ROMEO: But, soft! what light through yonder window breaks?", "  leading spaces\tand\ttabs\n\nnewlines ",
         "déjà vu — naïve café ☕ 東京", "def f(x):\n    return x ** 2  # code", "3.14159 + 2,718 = 5.86; 1e-9"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """A byte-level BPE (every byte, then merges up to VOCAB tokens; <s> and </s> first) trained on the built-in Shakespeare."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([sources.read_text(sources.BUILTIN_SHAKESPEARE)[:200_000]], trainer)
  return tok.to_str()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tokenizer_json):
  """(name, HF model, HF dir, imported gptjax dir) of one family, random weights with std 0.2."""
  name = request.param
  config_cls, model_cls, extra = FAMILIES[name]
  root = tmp_path_factory.mktemp(name)
  torch.manual_seed(0)
  model = model_cls(config_cls(**COMMON, **extra)).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.normal_(0.0, 0.2)
  model.save_pretrained(root / "hf")
  (root / "hf" / "tokenizer.json").write_text(tokenizer_json)
  convert.import_hf(str(root / "hf"), str(root / "gptjax"))
  return name, model, root / "hf", root / "gptjax"


def test_logits_equal_transformers(family):
  name, model, _, imported = family
  cfg, _, params, _ = load_checkpoint(imported)
  assert (cfg.model.kv_heads, cfg.model.tie_embeddings, cfg.model.qkv_bias, cfg.model.qk_norm) == {
      "llama": (2, False, False, False), "qwen2": (2, True, True, False), "qwen3": (2, True, False, True),
      "mixtral": (2, False, False, False), "qwen3_moe": (2, True, False, True)}[name]
  assert (cfg.model.n_experts, cfg.model.expert_size, cfg.model.moe_norm_topk, cfg.model.dense_layers) == {
      "mixtral": (4, 96, True, ()), "qwen3_moe": (4, 48, False, (0,))}.get(name, (0, 96, True, ()))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40))
  assert np.abs(gptjax_logits(cfg, params, tokens) - hf_logits(model, tokens)).max() <= 1e-4


def test_greedy_generation_equals_transformers_generate(family):
  _, model, _, imported = family
  cfg, tok, params, _ = load_checkpoint(imported)
  prompt = np.asarray([tok.encode("ROMEO: But, soft!")])
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=30, min_new_tokens=30,
                              pad_token_id=1)[0, prompt.shape[1]:].numpy()
  ours = sample.generate(cfg.model, params, prompt, max_new_tokens=30, rng=jax.random.key(0), temperature=0)
  assert ours[0].tolist()[:len(expected)] == expected.tolist()


def test_perplexity_equals_transformers_sliding_window(family):
  _, model, _, imported = family
  cfg, tok, params, _ = load_checkpoint(imported)
  tokens = np.asarray(tok.encode(sources.read_text(sources.BUILTIN_SHAKESPEARE)[:2000]))
  expected_nll, expected_count = transformers_sliding_window_nll(model, tokens, 64, 24)
  ours = evaluate.perplexity(cfg.model, params, tokens, stride=24)
  assert ours["tokens"] == expected_count and ours["nll"] == pytest.approx(expected_nll, rel=1e-4)


def test_export_loads_in_transformers_bit_equal_and_imports_back(family, tmp_path):
  _, model, _, imported = family
  convert.export_hf(str(imported), str(tmp_path / "hf"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert type(exported) is type(model)
  for name, tensor in model.state_dict().items():
    assert torch.equal(exported.state_dict()[name], tensor), name
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "again"))
  again, original = load_checkpoint(tmp_path / "again"), load_checkpoint(imported)
  assert again[0].model == original[0].model and again[1].to_meta() == original[1].to_meta()
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(again[2]), jax.tree.leaves(original[2])))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"], indirect=True)  # what no expert changes
def test_tokenizer_ids_equal_transformers_fast_tokenizer(family):
  _, _, hf_dir, imported = family
  tok = load_checkpoint(imported)[1]
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
  for text in TEXTS:
    assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(tok.encode(text)) == reference.decode(reference(text)["input_ids"]), text


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"], indirect=True)  # what no expert changes
def test_the_sample_command_reads_an_imported_llama(family):
  _, _, _, imported = family
  result = run_cli("sample", "--checkpoint", imported, "--prompt", "ROMEO:", "--num-samples", 1,
                   "--max-new-tokens", 10, "--temperature", 0)
  assert result.returncode == 0 and result.stdout.startswith("ROMEO:"), result.stderr


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"], indirect=True)  # what no expert changes
def test_grouped_query_attention_caches_only_the_key_value_heads(family):
  name, _, _, imported = family
  cfg = load_checkpoint(imported)[0].model
  gqa = jax.eval_shape(lambda: model_lib.bind(cfg, model_lib.init_params(cfg, jax.random.key(0))).init_cache(1))
  mha_cfg = dataclasses.replace(cfg, n_kv_head=0)
  mha = jax.eval_shape(lambda: model_lib.bind(mha_cfg, model_lib.init_params(mha_cfg, jax.random.key(0))).init_cache(1))
  size = lambda cache: sum(k.size for k in cache.key)  # noqa: E731
  assert size(mha) == size(gqa) * cfg.n_head // cfg.kv_heads == size(gqa) * 2
  for c, cache in ((cfg, gqa), (mha_cfg, mha)):  # what training's start-up report says
    nbytes = 2 * size(cache) * cache.key[0].dtype.itemsize
    assert f"KV cache for sampling: {nbytes / 2**20:,.2f} MiB per sequence" in metrics.kv_cache_report(c)
  assert "(2 key/value heads for 4 query heads)" in metrics.kv_cache_report(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"], indirect=True)  # what no expert changes
def test_unsupported_family_members_are_refused_in_one_line(family, tmp_path):
  _, _, hf_dir, _ = family
  shutil.copytree(hf_dir, tmp_path / "gelu")
  config = json.loads((hf_dir / "config.json").read_text()) | {"hidden_act": "gelu"}
  (tmp_path / "gelu" / "config.json").write_text(json.dumps(config))
  before = digest(tmp_path)
  one_line_error(run_cli("convert", "import", tmp_path / "gelu", tmp_path / "out"),
                 "hidden_act='gelu' (gptjax's SwiGLU uses silu) is not supported")
  assert digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_model_of_no_family_member_is_not_exported():
  cfg = config_lib.load_config("llama_shakespeare_cpu", ["model.qkv_bias=true", "model.qk_norm=true"]).model
  with pytest.raises(UserError, match="exports as no family member: Qwen2 has the q/k/v biases without the norm"):
    hf_llama.hf_config(cfg)
  assert hf_llama.hf_config(dataclasses.replace(cfg, qkv_bias=False))["model_type"] == "qwen3"


@pytest.mark.parametrize("family", ["llama"], indirect=True)  # the training path is the same for all
def test_fine_tuning_an_imported_llama_on_data_prepared_with_its_tokenizer_then_resuming(family, tmp_path):
  _, _, hf_dir, imported = family
  prepared = run_cli("prepare", "--tokenizer", hf_dir / "tokenizer.json", "--out", tmp_path / "data")
  assert prepared.returncode == 0, prepared.stderr
  common = ["train", "shakespeare_char_cpu", f"data.dir={tmp_path / 'data'}", f"train.init_from={imported}",
            f"train.out_dir={tmp_path / 'tuned'}", "train.batch_size=4", "train.eval_iters=2", "train.log_interval=2",
            "train.checkpoint_interval=4", "train.eval_interval=4", "optim.warmup_iters=2", "optim.lr_decay_iters=100",
            "--no-progress"]
  args = [*common, "model.block_size=32"]  # the model takes 64 positions; the run trains on 32
  first = run_cli(*args, "train.max_iters=4")
  assert first.returncode == 0, first.stderr
  assert f"fine-tuning {imported}" in first.stdout and "128 tokens/step (4 x 32: 1 micro-step of 4 per device)" in first.stdout
  resumed = run_cli(*args, "train.max_iters=6", "--resume")
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming at step 4 of 6" in resumed.stdout and "done: step 6" in resumed.stdout
  cfg = load_checkpoint(tmp_path / "tuned", "latest")[0]
  imported_model = load_checkpoint(imported)[0].model
  assert imported_model.position_limit == 64 and cfg.model.position_limit == 64
  assert cfg.model == dataclasses.replace(imported_model, block_size=32, max_positions=64)  # the import's, at the run's context
  assert run_cli("sample", "--checkpoint", tmp_path / "tuned", "--max-new-tokens", "40").returncode == 0  # past 32

  too_long = run_cli(*[a.replace("/tuned", "/long") for a in common], "model.block_size=128", "train.max_iters=4")
  one_line_error(too_long, f"model.block_size=128 is longer than the 64 positions {imported} takes: "
                           "set model.block_size to at most 64")
  assert not (tmp_path / "long").exists()


def test_a_tokenizer_whose_template_starts_sequences_with_bos(tokenizer_json, tmp_path):
  """Llama's tokenizer.json adds <s> (bos_token_id) before each text: gptjax's sequences start with
  it too (prompts, perplexity texts, prepared documents), and end documents with eos_token_id."""
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  (tmp_path / "tokenizer.json").write_text(tok.to_str())
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
  ours = tokenizer_lib.HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert (ours.bos_id, ours.eot_id) == (0, 1)
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  for text in TEXTS:
    assert tokenizer_lib.encode_sequence(ours, text) == reference(text)["input_ids"], text
  (tmp_path / "doc.txt").write_text("To be, or not to be: that is the question. " * 40)
  prepare.prepare(str(tmp_path / "doc.txt"), str(tmp_path / "tokenizer.json"), str(tmp_path / "data"))
  train_ids, val_ids = (data.load_tokens(str(tmp_path / "data"), split) for split in ("train", "val"))
  assert train_ids[0] == 0 and val_ids[-1] == 1
  assert tokenizer_lib.from_meta(ours.to_meta()).bos_id == 0


@pytest.mark.parametrize("family", ["qwen3", "mixtral"], indirect=True)
def test_sharded_safetensors_import_like_one_file(family, tmp_path):
  _, model, hf_dir, imported = family
  model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  shutil.copy(hf_dir / "tokenizer.json", tmp_path / "hf")
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "gptjax"))
  again, original = load_checkpoint(tmp_path / "gptjax")[2], load_checkpoint(imported)[2]
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(original)))


def test_qwen3_moe_dense_layers_are_its_mlp_only_layers_and_the_steps_between_sparse_ones():
  """transformers: layer i is sparse where it is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
  hf = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 50, "max_position_embeddings": 32, "num_hidden_layers": 6,
        "num_attention_heads": 2, "hidden_size": 16, "intermediate_size": 24, "rms_norm_eps": 1e-6, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
  cfg = hf_llama.model_config_from_hf(hf, "hf")
  assert cfg.dense_layers == (0, 2, 3, 4)
  assert [stack for stack, _ in cfg.layer_stacks()] == ["h_dense", "h", "h_dense", "h_dense", "h_dense", "h"]
  assert hf_llama.hf_config(cfg)["mlp_only_layers"] == [0, 2, 3, 4]
  with pytest.raises(UserError, match=r"hf: no sparse layer \(mlp_only_layers=\[1, 3, 5\], decoder_sparse_step=2\)"):
    hf_llama.model_config_from_hf(hf | {"mlp_only_layers": [1, 3, 5]}, "hf")
  with pytest.raises(UserError, match="hf: decoder_sparse_step=0 is not a positive whole number"):
    hf_llama.model_config_from_hf(hf | {"decoder_sparse_step": 0}, "hf")


def test_a_mixture_exports_as_the_family_member_that_computes_it():
  cfg = config_lib.load_config("moe_shakespeare_cpu", []).model
  assert hf_llama.hf_config(cfg)["model_type"] == "mixtral"
  assert hf_llama.hf_config(dataclasses.replace(cfg, qk_norm=True, moe_norm_topk=False))["model_type"] == "qwen3_moe"
  with pytest.raises(UserError, match="always renormalises the chosen experts' weights"):
    hf_llama.hf_config(dataclasses.replace(cfg, moe_norm_topk=False))
  with pytest.raises(UserError, match=r"no dense layers \(model.dense_layers\)"):
    hf_llama.hf_config(dataclasses.replace(cfg, dense_layers=(0,)))
  with pytest.raises(UserError, match="neither Mixtral nor Qwen3-MoE has a shared expert"):
    hf_llama.hf_config(dataclasses.replace(cfg, shared_expert_hidden=64))
