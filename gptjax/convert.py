"""Hugging Face interop: import a GPT-2, Llama, Qwen2, Qwen3, Mixtral or Qwen3-MoE directory as a gptjax
checkpoint, export one back. The GPT-2 layout is here; the Llama / Qwen family's is in `gptjax.hf_llama`.

    gptjax convert import ~/models/gpt2 out/gpt2            # config.json + model.safetensors
    gptjax convert export out/shakespeare_char_cpu hf/shakespeare --step best

An import reads config.json and model.safetensors (also sharded, with model.safetensors.index.json;
or pytorch_model.bin, which needs torch) and writes a weights-only checkpoint: sample and
perplexity read it like any run, and `train.init_from=OUT_DIR` fine-tunes from it. An export
writes a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads: config.json,
model.safetensors and, for GPT-2 BPE models, the tokenizer's vocab.json and merges.txt.

GPT-2 stores its Conv1D weights [in, out], as Flax stores Dense kernels, so only the attention
matrices change shape: c_attn [embd, 3 * embd] is [embd, 3, heads, head_dim] here and attn.c_proj
[embd, embd] is [heads, head_dim, embd]. GPT-2's per-layer tensors h.{i}.NAME are the slices
[i] of gptjax's stacked h/NAME. The LM head is tied to wte, so lm_head.weight is not stored. A model's tokenizer is GPT-2's BPE unless config.json names a gptjax one
(`gptjax_tokenizer`, written when exporting a character-level model).
"""

import argparse
import json
import math
import os
import pathlib
import re
import tempfile

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util
from tqdm import tqdm

from gptjax import checkpoint
from gptjax import config as config_lib
from gptjax import hf_llama
from gptjax import model as model_lib
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the GELU approximation this model computes
_PREFIX = "transformer."
_ATTENTION_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")  # causal-mask buffers in old files


def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
  """(("h", "attn", "c_attn", "kernel"), 3) -> "h.3.attn.c_attn.weight"."""
  parts = ["h", str(layer), *path[1:-1]] if layer is not None else list(path[:-1])
  return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """GPT-2's shape of one layer's tensor of gptjax `shape` (without the layer axis)."""
  if path[-1] == "kernel":  # Conv1D [in, out]; attn.c_proj has two input axes (heads, head_dim)
    n_in = 2 if path[-3:-1] == ("attn", "c_proj") else 1
    return (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  if path[-1] == "embedding":
    return shape
  return (math.prod(shape),)  # biases and LayerNorm scales are flat


def hf_layout(cfg: config_lib.ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...], tuple[int, ...]]]:
  """GPT-2 tensor name (without `transformer.`) -> (gptjax path, layer index in the stacked
  blocks or None, gptjax shape of that one tensor, GPT-2 shape)."""
  layout = {}
  for path, s in traverse_util.flatten_dict(model_lib.abstract_params(cfg)[0]).items():
    layers = range(cfg.n_layer) if path[0] == "h" else [None]
    shape = s.shape[1:] if path[0] == "h" else (cfg.vocab_size, cfg.n_embd) if path[0] == "wte" else s.shape
    for layer in layers:
      layout[_hf_name(path, layer)] = (path, layer, shape, _hf_shape(path, shape))
  return layout


def params_to_hf(params, cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """gptjax parameters -> GPT2LMHeadModel's state dict (float32 numpy arrays)."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  flat[("wte", "embedding")] = flat[("wte", "embedding")][:cfg.vocab_size]  # without vocab_multiple's padding
  tensors = {}
  for name, (path, layer, _, hf_shape) in hf_layout(cfg).items():
    value = flat[path] if layer is None else flat[path][layer]
    tensors[_PREFIX + name] = np.ascontiguousarray(np.asarray(value, np.float32).reshape(hf_shape))
  return tensors


def params_from_hf(tensors: dict[str, np.ndarray], cfg: config_lib.ModelConfig, source: str):
  """GPT-2 tensors (with or without the `transformer.` prefix) -> gptjax parameters (float32)."""
  tensors = {k.removeprefix(_PREFIX): v for k, v in tensors.items()}
  layout = hf_layout(cfg)
  lm_head = tensors.pop("lm_head.weight", None)
  if lm_head is not None and not np.array_equal(lm_head, tensors.get("wte.weight")):
    raise UserError(f"{source}: lm_head.weight differs from wte.weight; gptjax ties the LM head to the token embedding")
  unexpected = sorted(k for k in tensors if k not in layout and not _ATTENTION_BUFFER.fullmatch(k))
  if unexpected:
    raise UserError(f"{source}: unexpected tensors for a GPT-2 LM ({', '.join(unexpected[:3])}"
                    f"{', ...' if len(unexpected) > 3 else ''})")
  per_layer = {}  # gptjax path -> its layers' tensors, in order
  for name, (path, layer, shape, hf_shape) in layout.items():
    if name not in tensors:
      raise UserError(f"{source}: missing tensor {name} (config.json: n_layer={cfg.n_layer}); "
                      "the directory is incomplete or its config does not match its weights")
    if tuple(tensors[name].shape) != hf_shape:
      raise UserError(f"{source}: {name} has shape {tuple(tensors[name].shape)} but config.json implies {hf_shape}")
    per_layer.setdefault(path, []).append(np.asarray(tensors[name], np.float32).reshape(shape))
  flat = {path: np.stack(values) if path[0] == "h" else values[0] for path, values in per_layer.items()}
  flat[("wte", "embedding")] = np.pad(flat[("wte", "embedding")], ((0, cfg.padded_vocab - cfg.vocab_size), (0, 0)))
  return traverse_util.unflatten_dict(flat)


def model_config_from_hf(hf: dict, source: str) -> config_lib.ModelConfig:
  """The gptjax model of a GPT-2 config.json, after checking it describes what gptjax computes."""
  architectures = hf.get("architectures") or ["GPT2LMHeadModel"]
  if hf.get("model_type") != "gpt2" or not set(architectures) <= set(GPT2_ARCHITECTURES):
    raise UserError(f"{source}: a {hf.get('model_type')!r} model ({', '.join(map(str, architectures))}), "
                    f"not GPT-2; gptjax imports {', '.join(GPT2_ARCHITECTURES + tuple(hf_llama.ARCHITECTURES))}")
  checks = [
      (hf.get("activation_function", "gelu_new") in TANH_GELUS,
       f"activation_function={hf.get('activation_function')!r}; gptjax computes {' / '.join(TANH_GELUS)}"),
      (hf.get("n_inner") in (None, 4 * hf.get("n_embd", 0)), f"n_inner={hf.get('n_inner')} is not 4 * n_embd"),
      (hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
       "attention scaling other than 1/sqrt(head_dim)"),
      (hf.get("tie_word_embeddings", True), "tie_word_embeddings=false (an untied LM head)"),
      (not hf.get("add_cross_attention", False), "cross-attention layers"),
  ]
  for ok, what in checks:
    if not ok:
      raise UserError(f"{source}: {what} is not supported")
  try:
    cfg = config_lib.ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        dropout=0.0, bias=True)
  except KeyError as e:
    raise UserError(f"{source}: no {e.args[0]}") from None
  return config_lib.validate(config_lib.Config(model=cfg)).model


def hf_config(cfg: config_lib.ModelConfig, tokenizer_meta: dict) -> dict:
  """A GPT2LMHeadModel config.json for a gptjax model."""
  not_gpt2 = {"bias": not cfg.bias, "positions": cfg.positions != "learned", "norm": cfg.norm != "layernorm",
              "mlp": cfg.mlp != "gelu", "mlp_hidden": cfg.mlp_size != 4 * cfg.n_embd,
              "n_kv_head": cfg.kv_heads != cfg.n_head, "head_dim": cfg.head_size * cfg.n_head != cfg.n_embd,
              "tie_embeddings": not cfg.tie_embeddings, "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
              "n_experts": cfg.n_experts > 0}
  differs = [f"model.{name}={getattr(cfg, name)!r}" for name, differ in not_gpt2.items() if differ]
  if differs:
    raise UserError(f"{', '.join(differs)}: not GPT-2's architecture, and not the Llama family's either "
                    "(rotary positions, RMSNorm, SwiGLU and no biases export as Llama or Qwen, a mixture of "
                    "experts as Mixtral or Qwen3-MoE)")
  config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
      "n_positions": cfg.position_limit, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
      "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
      "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
      "use_cache": True, "torch_dtype": "float32",
  }
  eot_id = tokenizer_lib.from_meta(tokenizer_meta).eot_id  # None for characters: no GPT-2 default
  config.update(bos_token_id=eot_id, eos_token_id=eot_id)
  if tokenizer_meta["kind"] != "gpt2":
    config["gptjax_tokenizer"] = tokenizer_meta
  return config


def read_hf_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of model.safetensors, its shards, or pytorch_model.bin."""
  index = hf_dir / "model.safetensors.index.json"
  if (hf_dir / "model.safetensors").is_file():
    files = [hf_dir / "model.safetensors"]
  elif index.is_file():
    files = [hf_dir / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
  elif (hf_dir / "pytorch_model.bin").is_file():
    return _read_torch_pickle(hf_dir / "pytorch_model.bin")
  else:
    raise UserError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
  tensors = {}
  with tqdm(total=sum(p.stat().st_size for p in files if p.is_file()), unit="B", unit_scale=True, desc="read",
            dynamic_ncols=True, disable=None) as bar:  # None: only on a terminal
    for path in files:
      try:
        tensors.update(safetensors.numpy.load_file(path))
      except (safetensors.SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]} (truncated or not safetensors?)") from None
      bar.update(path.stat().st_size)
  return tensors


def _read_torch_pickle(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # only for this legacy format; gptjax itself does not need torch
  except ImportError:
    raise UserError(f"{path} is a PyTorch pickle, which needs torch to read (pip install torch); "
                    "or save the model with safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a damaged file
    raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
  return {name: tensor.to(torch.float32).numpy() for name, tensor in state.items()}


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise UserError(f"{path} does not exist") from None
  except (ValueError, OSError) as e:
    raise UserError(f"cannot read {path}: {e}") from None


def _merge_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line and not line.startswith("#version")]


def check_tokenizer(hf_dir: pathlib.Path, hf: dict, source: str) -> dict:
  """The model's tokenizer meta, after checking it agrees with config.json and any tokenizer files."""
  meta = hf.get("gptjax_tokenizer", {"kind": "gpt2"})
  tok = tokenizer_lib.from_meta(meta)
  if hf["vocab_size"] != tok.vocab_size:
    raise UserError(f"{source}: vocab_size={hf['vocab_size']} disagrees with the {meta['kind']} tokenizer's "
                    f"{tok.vocab_size} tokens")
  if meta["kind"] == "gpt2":
    gpt2_vocab = json.loads((tokenizer_lib.GPT2_ASSETS / "encoder.json").read_text(encoding="utf-8"))
    vocab = hf_dir / "vocab.json"
    if vocab.is_file() and _read_json(vocab) != gpt2_vocab:
      raise UserError(f"{vocab} is not GPT-2's vocabulary; gptjax's GPT-2 tokenizer would give other ids")
    merges = hf_dir / "merges.txt"
    gpt2_merges = _merge_lines((tokenizer_lib.GPT2_ASSETS / "vocab.bpe").read_text(encoding="utf-8"))
    if merges.is_file() and _merge_lines(merges.read_text(encoding="utf-8")) != gpt2_merges:
      raise UserError(f"{merges} is not GPT-2's merge list; gptjax's GPT-2 tokenizer would give other ids")
    tokenizer_json = hf_dir / "tokenizer.json"
    if tokenizer_json.is_file() and _read_json(tokenizer_json).get("model", {}).get("vocab") != gpt2_vocab:
      raise UserError(f"{tokenizer_json} is not GPT-2's vocabulary; gptjax's GPT-2 tokenizer would give other ids")
  return meta


def _llama_tokenizer(hf_dir: pathlib.Path, hf: dict, source: str) -> dict:
  """A Llama / Qwen directory's tokenizer: tokenizer.json, ending generation at config's eos_token_id
  (or a gptjax character vocabulary that an export wrote into config.json)."""
  if "gptjax_tokenizer" in hf:
    return hf["gptjax_tokenizer"]
  if not (hf_dir / "tokenizer.json").is_file():
    raise UserError(f"{hf_dir} has no tokenizer.json")
  tok = tokenizer_lib.HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))  # end-of-text: config's eos_token_id
  if tok.vocab_size > hf["vocab_size"]:
    raise UserError(f"{source}: vocab_size={hf['vocab_size']} is smaller than tokenizer.json's {tok.vocab_size} tokens")
  return tok.to_meta()


def import_hf(hf_dir: str, out_dir: str) -> config_lib.Config:
  """Writes the GPT-2, Llama or Qwen model in `hf_dir` to `out_dir` as a weights-only gptjax checkpoint."""
  path = pathlib.Path(hf_dir)
  if not path.is_dir():
    raise UserError(f"{hf_dir} is not a directory (download a model first, e.g. "
                    f"`huggingface-cli download gpt2 --local-dir {hf_dir}`)")
  source = str(path / "config.json")
  hf = _read_json(path / "config.json")
  if (hf.get("architectures") or [None])[0] in hf_llama.ARCHITECTURES:
    cfg = config_lib.Config(model=hf_llama.model_config_from_hf(hf, source))
    tokenizer_meta = _llama_tokenizer(path, hf, source)
    params = hf_llama.params_from_hf(read_hf_tensors(path), cfg.model, str(path),
                                     hf_llama.ARCHITECTURES[hf["architectures"][0]])
  else:
    cfg = config_lib.Config(model=model_config_from_hf(hf, source))
    tokenizer_meta = check_tokenizer(path, hf, source)
    params = params_from_hf(read_hf_tensors(path), cfg.model, str(path))
  checkpoint.save_weights(out_dir, params, config=cfg, tokenizer=tokenizer_meta)
  return cfg


def export_hf(run_dir: str, hf_dir: str, which: str = "best") -> int:
  """Writes the checkpoint `which` of `run_dir` to the new directory `hf_dir`; returns its step."""
  out = pathlib.Path(hf_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"{hf_dir} already exists and is not empty; choose a new directory")
  cfg, tokenizer_meta, params, step = checkpoint.load_for_inference(run_dir, which)
  if variants := cfg.model.textbook_variants():
    raise UserError(f"{', '.join(variants)}: neither GPT-2 nor the Llama family computes this, so Hugging Face "
                    "cannot hold it; the checkpoint works with every gptjax command")
  if cfg.model.positions == "rope":  # the Llama / Qwen family
    config, tensors = hf_llama.hf_config(cfg.model), hf_llama.params_to_hf(params, cfg.model)
    tok = tokenizer_lib.from_meta(tokenizer_meta)
    config.update(bos_token_id=tok.eot_id if tok.bos_id is None else tok.bos_id, eos_token_id=tok.eot_id)
    if tokenizer_meta["kind"] != "hf":
      config["gptjax_tokenizer"] = tokenizer_meta
  else:
    config, tensors = hf_config(cfg.model, tokenizer_meta), params_to_hf(params, cfg.model)
  # Write beside the target, then rename: a failure never leaves a half-written model behind.
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  safetensors.numpy.save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
  (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  if tokenizer_meta["kind"] == "hf":
    (staging / "tokenizer.json").write_text(tokenizer_meta["tokenizer_json"], encoding="utf-8")
  if tokenizer_meta.get("chat_template"):
    (staging / "tokenizer_config.json").write_text(json.dumps({"chat_template": tokenizer_meta["chat_template"]}))
  if tokenizer_meta["kind"] == "gpt2":
    (staging / "vocab.json").write_bytes((tokenizer_lib.GPT2_ASSETS / "encoder.json").read_bytes())
    (staging / "merges.txt").write_bytes((tokenizer_lib.GPT2_ASSETS / "vocab.bpe").read_bytes())
  if out.exists():
    out.rmdir()  # empty, checked above
  os.rename(staging, out)
  return step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  to_gptjax = commands.add_parser("import", help="a Hugging Face GPT-2 directory -> a gptjax checkpoint")
  to_gptjax.add_argument("hf_dir", help="holds config.json and model.safetensors (or pytorch_model.bin)")
  to_gptjax.add_argument("out_dir", help="a new run directory for the checkpoint")
  to_hf = commands.add_parser("export", help="a gptjax checkpoint -> a Hugging Face GPT-2 directory")
  to_hf.add_argument("run_dir", help="a run's out_dir (or an imported checkpoint)")
  to_hf.add_argument("hf_dir", help="a new directory for config.json, model.safetensors and tokenizer files")
  to_hf.add_argument("--step", default="best", help="best (lowest val loss), latest, or a step number")
  args = parser.parse_args(argv)

  if args.command == "import":
    cfg = import_hf(args.hf_dir, args.out_dir)
    m = cfg.model
    print(f"imported {args.hf_dir} -> {args.out_dir}: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
          f"context {m.block_size}, vocabulary {m.vocab_size}")
  else:
    step = export_hf(args.run_dir, args.hf_dir, args.step)
    print(f"exported {args.run_dir} step {step} -> {args.hf_dir}")
