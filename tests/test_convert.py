"""GPT-2 interop, checked against transformers' GPT2LMHeadModel (torch, CPU) as the reference.

No network: the reference models are random-weight GPT2LMHeadModels saved with `save_pretrained`.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import torch
import transformers

from gptjax import checkpoint
from gptjax import cli
from gptjax import config as config_lib
from gptjax import convert
from gptjax import data
from gptjax import evaluate
from gptjax import model as model_lib
from gptjax import sample
from gptjax import tokenizer as tokenizer_lib
from gptjax import train
from gptjax import sources
from gptjax import prepare

from conftest import (digest, gptjax_logits, hf_logits, load_checkpoint, one_line_error, run_cli,
                      transformers_sliding_window_nll)

PROMPT = "It is a truth universally acknowledged, that a single man"


def _hf_model(path, seed=0, **config):
  """A random GPT2LMHeadModel saved (safetensors) under `path`; returns the model in eval mode."""
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
  model.save_pretrained(path)
  return model


def _convert(capsys, *args):
  """`gptjax convert ARGS` in this process (as the command runs it), as a CompletedProcess."""
  try:
    cli.main(["convert", *map(str, args)])
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(HF model, HF dir, imported gptjax dir): 2 layers, 4 heads, 64 wide, context 64, GPT-2's vocabulary.
  The larger initializer_range makes the random model's next-token choices clear-cut."""
  root = tmp_path_factory.mktemp("small")
  model = _hf_model(root / "hf", n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2)
  result = run_cli("convert", "import", root / "hf", root / "gptjax")
  assert result.returncode == 0, result.stderr
  assert "2 layers, 4 heads, 64 wide, context 64, vocabulary 50257" in result.stdout
  return model, root / "hf", root / "gptjax"


def test_logits_equal_transformers_small(small):
  model, _, imported = small
  cfg, tok, params, step = load_checkpoint(imported)
  assert step == 0 and tok.to_meta() == {"kind": "gpt2"}
  tokens = np.random.default_rng(0).integers(0, 50257, size=(3, 64))  # the full context
  diff = np.abs(gptjax_logits(cfg, params, tokens) - hf_logits(model, tokens)).max()
  assert diff <= 1e-4, diff


@pytest.mark.slow  # 32 s; the small GPT-2 above checks the same mapping in the default run
def test_logits_equal_transformers_gpt2_124m_shape(tmp_path):
  model = _hf_model(tmp_path / "hf")  # GPT2Config's defaults: GPT-2 small, 124M parameters
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "gptjax"))
  cfg, _, params, _ = load_checkpoint(tmp_path / "gptjax")
  assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
  assert model_lib.count_params(params) == sum(p.numel() for p in model.parameters()) == 124_439_808
  tokens = np.asarray([tokenizer_lib.GPT2Tokenizer().encode(PROMPT * 8)])
  diff = np.abs(gptjax_logits(cfg, params, tokens) - hf_logits(model, tokens)).max()
  assert diff <= 1e-4, diff


def test_greedy_generation_equals_transformers_generate(small):
  model, _, imported = small
  cfg, tok, params, _ = load_checkpoint(imported)
  prompt = np.asarray([tok.encode(PROMPT)])
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=50,
                              pad_token_id=tok.eot_id)[0, prompt.shape[1]:].numpy()
  ours = sample.generate(cfg.model, params, prompt, max_new_tokens=50, rng=jax.random.key(0), temperature=0)
  assert ours[0].tolist() == expected.tolist()

  # The sample command on the imported checkpoint prints the same continuation (up to end-of-text).
  result = run_cli("sample", "--checkpoint", imported, "--prompt", PROMPT, "--temperature", "0",
                   "--num-samples", "1", "--max-new-tokens", "50")
  assert result.returncode == 0, result.stderr
  expected = expected.tolist()
  expected = expected[:expected.index(tok.eot_id)] if tok.eot_id in expected else expected
  assert result.stdout.split("\n---------------")[0] == PROMPT + tok.decode(expected)


def test_perplexity_equals_transformers_sliding_window(small, tmp_path):
  model, _, imported = small
  cfg, tok, params, _ = load_checkpoint(imported)
  text = sources.read_text(sources.BUILTIN_SHAKESPEARE)[:3000]
  tokens = evaluate.document_tokens(tok, text)  # after end-of-text, as the command reads a text
  assert tokens[0] == tok.eot_id and tokens[1:].tolist() == tok.encode(text)
  expected_nll, expected_count = transformers_sliding_window_nll(model, tokens, 64, 24)
  ours = evaluate.perplexity(cfg.model, params, tokens, stride=24)
  assert ours["tokens"] == expected_count == len(tokens) - 1
  assert ours["nll"] == pytest.approx(expected_nll, rel=1e-4)

  # The perplexity command reads the imported checkpoint as it reads a trained one.
  (tmp_path / "text.txt").write_text(text)
  result = run_cli("perplexity", "--checkpoint", imported, "--text", tmp_path / "text.txt", "--stride", "24")
  assert result.returncode == 0, result.stderr
  assert f"mean NLL {expected_nll:.4f} nats" in result.stdout, result.stdout


def _params_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_export_of_a_trained_run_loads_in_transformers_and_round_trips(tiny_run, tmp_path, capsys):
  out_dir, _ = tiny_run  # character-level: the tokenizer travels in config.json
  result = _convert(capsys, "export", out_dir, tmp_path / "hf")
  assert result.returncode == 0, result.stderr
  cfg, tok, params, _ = load_checkpoint(out_dir)
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
  tokens = np.asarray([tok.encode("ROMEO:\nWhat light through yonder")])
  assert np.abs(gptjax_logits(cfg, params, tokens) - hf_logits(exported, tokens)).max() <= 1e-4

  assert _convert(capsys, "import", tmp_path / "hf", tmp_path / "again").returncode == 0
  cfg_again, tok_again, params_again, _ = load_checkpoint(tmp_path / "again")
  assert _params_equal(params_again, params)
  assert tok_again.to_meta() == tok.to_meta() and cfg_again.model == cfg.model


def test_export_of_an_import_round_trips_with_gpt2_tokenizer_files(small, tmp_path, capsys):
  model, _, imported = small
  assert _convert(capsys, "export", imported, tmp_path / "hf").returncode == 0
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
  for name, tensor in model.state_dict().items():
    assert torch.equal(exported.state_dict()[name], tensor), name
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert hf_tokenizer(PROMPT)["input_ids"] == tokenizer_lib.GPT2Tokenizer().encode(PROMPT)

  assert _convert(capsys, "import", tmp_path / "hf", tmp_path / "again").returncode == 0
  assert _params_equal(load_checkpoint(tmp_path / "again")[2], load_checkpoint(imported)[2])


@pytest.mark.parametrize("layout", ["sharded safetensors", "pytorch_model.bin"])
def test_other_weight_files_import_like_model_safetensors(small, tmp_path, capsys, layout):
  model, _, imported = small
  if layout == "sharded safetensors":
    model.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  else:
    (tmp_path / "hf").mkdir()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")  # includes the tied lm_head
    model.config.to_json_file(tmp_path / "hf" / "config.json")
  assert _convert(capsys, "import", tmp_path / "hf", tmp_path / "gptjax").returncode == 0
  assert _params_equal(load_checkpoint(tmp_path / "gptjax")[2], load_checkpoint(imported)[2])


def test_gpt2_tokenizer_ids_equal_hugging_face(tmp_path):
  # Hugging Face's GPT-2 tokenizer files are OpenAI's, renamed: encoder.json -> vocab.json, vocab.bpe -> merges.txt.
  (tmp_path / "vocab.json").write_bytes((tokenizer_lib.GPT2_ASSETS / "encoder.json").read_bytes())
  (tmp_path / "merges.txt").write_bytes((tokenizer_lib.GPT2_ASSETS / "vocab.bpe").read_bytes())
  hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
  ours = tokenizer_lib.GPT2Tokenizer()
  texts = [
      sources.read_text(sources.BUILTIN_SHAKESPEARE)[:20000],
      "Hello world!  It's 2026... naïve café, Ünïcödé, 日本語, emoji 🤖🎉, don't I'm we'll they've",
      "  leading spaces\n\n\ttabs\r\nwindows lines   trailing  ",
      "numbers 3.14159 1,000,000 0x1F $42 -7 +8 100%",
      "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code\n",
  ]
  for text in texts:
    assert ours.encode(text) == hf_tokenizer(text)["input_ids"], text[:40]
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.slow  # 37 s; test_hf_llama fine-tunes an import and resumes in the default run
def test_fine_tuning_starts_from_imported_weights(small, tmp_path):
  _, _, imported = small
  prepare.prepare(sources.BUILTIN_SHAKESPEARE, "gpt2", str(tmp_path / "data"))

  def config(out_name, *extra):  # the shipped recipe, shortened, with a learning rate for a random model
    overrides = [
        f"data.dir={tmp_path / 'data'}", f"train.init_from={imported}", f"train.out_dir={tmp_path / out_name}",
        "model.dropout=0.1", "model.block_size=64", "train.batch_size=8", "train.device_batch_size=0",
        "train.max_iters=10", "train.eval_iters=2",
        "train.checkpoint_interval=5", "train.log_interval=5", "optim.learning_rate=2e-3", "optim.min_lr=2e-4", *extra]
    return config_lib.load_config("finetune_shakespeare", list({o.split("=")[0]: o for o in overrides}.values()))

  # Zero steps: the loss is the imported model's own, evaluated on the same batches.
  before, _ = train.train(config("zero", "train.max_iters=0"), progress_bar=False)
  cfg, _, params, _ = load_checkpoint(imported)
  batches = data.TokenBatches(data.load_tokens(tmp_path / "data", "val"), batch_size=8,
                              block_size=cfg.model.block_size, seed=1337 + 2)
  expected = np.mean([optax.softmax_cross_entropy_with_integer_labels(gptjax_logits(cfg, params, x[0]), y[0]).mean() for x, y in
                      (batches.batch(i) for i in range(2))])
  assert before["step"] == 0 and before["val_loss"] == pytest.approx(expected, rel=1e-5)

  after, _ = train.train(config("tuned"), progress_bar=False)
  assert after["step"] == 10 and after["val_loss"] < before["val_loss"] - 1.0
  tuned_cfg, _, _ = checkpoint.read_run_config(str(tmp_path / "tuned"), "latest")
  # The source's architecture, not the config's GPT-2 124M; its positions kept as model.max_positions.
  assert tuned_cfg.model == dataclasses.replace(cfg.model, dropout=0.1, max_positions=cfg.model.position_limit)
  assert train.train(config("tuned", "train.max_iters=12"), resume=True, progress_bar=False)[0]["step"] == 12


# Bad input: one line, exit status 2, nothing written or changed.

def _edit_config(src, dst, **changes):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  config = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**config, **changes}))
  return dst


def test_import_errors(small, tmp_path, capsys):
  _, hf_dir, _ = small
  truncated = _edit_config(hf_dir, tmp_path / "truncated")
  weights = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
  wrong_merges = _edit_config(hf_dir, tmp_path / "merges")
  merges = (tokenizer_lib.GPT2_ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()
  (wrong_merges / "merges.txt").write_text("\n".join([merges[0], merges[2], merges[1], *merges[3:]]), encoding="utf-8")
  wrong_vocab = _edit_config(hf_dir, tmp_path / "vocab")
  vocab = json.loads((tokenizer_lib.GPT2_ASSETS / "encoder.json").read_text())
  vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
  (wrong_vocab / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "empty").mkdir()
  cases = [
      (tmp_path / "missing", "is not a directory"),
      (tmp_path / "empty", "config.json does not exist"),
      (_edit_config(hf_dir, tmp_path / "layers", n_layer=3), "missing tensor h.2."),
      (_edit_config(hf_dir, tmp_path / "width", n_embd=128), "h.0.attn.c_attn.bias has shape (192,) but config.json implies (384,)"),
      (truncated, "truncated or not safetensors"),
      (_edit_config(hf_dir, tmp_path / "mistral", model_type="mistral", architectures=["MistralForCausalLM"]),
       "a 'mistral' model (MistralForCausalLM), not GPT-2"),
      (_edit_config(hf_dir, tmp_path / "classifier", architectures=["GPT2ForSequenceClassification"]), "not GPT-2"),
      (_edit_config(hf_dir, tmp_path / "gelu", activation_function="relu"), "activation_function='relu'"),
      (_edit_config(hf_dir, tmp_path / "vocab_size", vocab_size=50304), "vocab_size=50304 disagrees with the gpt2 tokenizer's 50257"),
      (wrong_vocab, "is not GPT-2's vocabulary"),
      (wrong_merges, "is not GPT-2's merge list"),
  ]
  before = digest(tmp_path)
  for source, message in cases:
    one_line_error(_convert(capsys, "import", source, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists(), source
  assert digest(tmp_path) == before


def test_import_needs_torch_only_for_pytorch_pickles(small, tmp_path):
  model, hf_dir, _ = small
  (tmp_path / "bin").mkdir()
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  model.config.to_json_file(tmp_path / "bin" / "config.json")

  def convert_without_torch(*args):
    without_torch = "import sys; sys.modules['torch'] = None; from gptjax import cli; cli.main()"
    return subprocess.run([sys.executable, "-c", without_torch, "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)

  result = convert_without_torch("import", hf_dir, tmp_path / "from_safetensors")
  assert result.returncode == 0, result.stderr
  one_line_error(convert_without_torch("import", tmp_path / "bin", tmp_path / "from_bin"),
                 "pytorch_model.bin is a PyTorch pickle, which needs torch")


def test_convert_never_overwrites(small, tmp_path, capsys):
  _, hf_dir, imported = small
  before = digest(imported)
  one_line_error(_convert(capsys, "import", hf_dir, imported), "already holds checkpoints")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "notes.txt").write_text("mine")
  one_line_error(_convert(capsys, "export", imported, tmp_path / "taken"), "already exists and is not empty")
  assert digest(imported) == before and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
  assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging directory left behind


def test_imported_checkpoint_cannot_be_resumed(small, char_data):
  _, _, imported = small
  before = digest(imported), digest(char_data)
  result = run_cli("train", "shakespeare_char_cpu", f"data.dir={char_data}", f"train.out_dir={imported}", "--resume")
  one_line_error(result, "holds model weights only", f"train.init_from={imported}")
  assert (digest(imported), digest(char_data)) == before


def test_a_padded_vocabulary_exports_without_its_padding_and_other_architectures_are_refused(tmp_path, capsys):
  cfg = config_lib.Config(model=config_lib.ModelConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                                       vocab_multiple=128))  # nanoGPT's 50304
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  assert params["wte"]["embedding"].shape == (50304, 32)
  checkpoint.save_weights(str(tmp_path / "run"), params, config=cfg, tokenizer={"kind": "gpt2"})
  assert _convert(capsys, "export", tmp_path / "run", tmp_path / "hf").returncode == 0
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
  tokens = np.asarray([tokenizer_lib.GPT2Tokenizer().encode(PROMPT)])
  assert np.abs(gptjax_logits(cfg, params, tokens)[..., :50257] - hf_logits(exported, tokens)).max() <= 1e-4
  assert _convert(capsys, "import", tmp_path / "hf", tmp_path / "again").returncode == 0
  np.testing.assert_array_equal(load_checkpoint(tmp_path / "again")[2]["wte"]["embedding"],
                                params["wte"]["embedding"][:50257])

  rms = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm="rmsnorm", vocab_multiple=1))
  checkpoint.save_weights(str(tmp_path / "rms"), model_lib.init_params(rms.model, jax.random.key(0)), config=rms,
                          tokenizer={"kind": "gpt2"})
  before = digest(tmp_path / "rms")
  one_line_error(_convert(capsys, "export", tmp_path / "rms", tmp_path / "hf_rms"), "model.norm='rmsnorm': not GPT-2's")
  assert not (tmp_path / "hf_rms").exists() and digest(tmp_path / "rms") == before

  gelu_experts = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_experts=4, vocab_multiple=1))
  checkpoint.save_weights(str(tmp_path / "moe"), model_lib.init_params(gelu_experts.model, jax.random.key(0)),
                          config=gelu_experts, tokenizer={"kind": "gpt2"})
  one_line_error(_convert(capsys, "export", tmp_path / "moe", tmp_path / "hf_moe"), "model.n_experts=4: not GPT-2's")
  assert not (tmp_path / "hf_moe").exists()


@pytest.mark.parametrize("variant,named", [
    (dict(norm_position="post"), "model.norm_position=post, model.final_norm=auto"),
    (dict(positions="sinusoidal"), "model.positions=sinusoidal"), (dict(positions="none"), "model.positions=none"),
    (dict(attention_scale="none"), "model.attention_scale=none"),
    (dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, final_norm="false"), "model.final_norm=false")])
def test_textbook_variants_are_refused_by_export_in_one_line(tmp_path, capsys, variant, named):
  cfg = config_lib.Config(model=config_lib.ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                                       **variant))
  checkpoint.save_weights(str(tmp_path / "run"), model_lib.init_params(cfg.model, jax.random.key(0)), config=cfg,
                          tokenizer={"kind": "gpt2"})
  before = digest(tmp_path / "run")
  one_line_error(_convert(capsys, "export", tmp_path / "run", tmp_path / "hf"),
                 f"{named}: neither GPT-2 nor the Llama family")
  assert not (tmp_path / "hf").exists() and digest(tmp_path / "run") == before
