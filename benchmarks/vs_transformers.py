"""gptjax against PyTorch + transformers on the same machine: train-step throughput and greedy
sampling, side by side.

    python benchmarks/vs_transformers.py                    # everything, 5 alternated rounds
    python benchmarks/vs_transformers.py --only train --rounds 3 --compile   # also torch.compile
    python benchmarks/vs_transformers.py --tiny             # tiny shapes, one round: the script works

Each measurement runs in a fresh process (two frameworks in one process slow each other); the
implementations take turns inside every round, in reversed order every other round, and the tables
report medians over rounds with each round's ratio beside them. Training: gptjax as `gptjax train`
runs it (the logged tokens/s over 5-step intervals, the first left out), transformers'
GPT2LMHeadModel / LlamaForCausalLM with torch AdamW and gradient clipping on the same batches
(eager; `--compile` adds `torch.compile`). Sampling: greedy, new tokens/s of `gptjax.sample.generate`
against `model.generate` with its KV cache, and the time to the first token of a long prompt.
Needs the test extras (torch, transformers). Prints markdown tables.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPT2, LLAMA = [], ["model.bias=false", "model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
                   "model.tie_embeddings=false"]

# (title, data: char or gpt2, steps, model and batch overrides): the shapes, fp32, no dropout.
TRAIN_SHAPES = [
    ("GPT-2 4x128, ctx 64, batch 12, vocab 77", "char", 40, GPT2 + [
        "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=64", "train.batch_size=12"]),
    ("GPT-2 6x384, ctx 256, batch 8, vocab 77", "char", 20, GPT2 + [
        "model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.block_size=256", "train.batch_size=8"]),
    ("GPT-2 4x256, ctx 128, batch 8, vocab 50257", "gpt2", 20, GPT2 + [
        "model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=128", "train.batch_size=8"]),
    ("Llama 4x128 (GQA 4/2), ctx 64, batch 12, vocab 77", "char", 40, LLAMA + [
        "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.n_kv_head=2", "model.mlp_hidden=384",
        "model.block_size=64", "train.batch_size=12"]),
    ("Llama 6x384 (GQA 6/2), ctx 256, batch 8, vocab 77", "char", 20, LLAMA + [
        "model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.n_kv_head=2", "model.mlp_hidden=1024",
        "model.block_size=256", "train.batch_size=8"]),
]
TINY_TRAIN = [("GPT-2 2x32, ctx 32, batch 4, vocab 77", "char", 16, GPT2 + [
    "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.batch_size=4"])]
# Sampling: the issue's 4x256 model with GPT-2's vocabulary and context.
SAMPLE_MODEL = GPT2 + ["model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=1024",
                       "model.vocab_size=50257"]
TINY_SAMPLE = GPT2 + ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=64", "model.vocab_size=77"]
LOG_INTERVAL = 5


# ---- workers: each runs in a process of its own and prints one JSON line ----

def _model_config(overrides):
  from gptjax import config as config_lib
  return config_lib.load_config("shakespeare_char_cpu", overrides)


def gptjax_train(overrides, n_steps, data_dir):
  import contextlib
  import io

  from gptjax import config as config_lib
  from gptjax import train
  with tempfile.TemporaryDirectory() as out:
    cfg = config_lib.load_config("shakespeare_char_cpu", [
        *overrides, f"data.dir={data_dir}", f"train.out_dir={out}", f"train.max_iters={n_steps}",
        f"train.log_interval={LOG_INTERVAL}", "train.eval_interval=1000000", "train.checkpoint_interval=1000000",
        "train.eval_iters=1"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
      train.train(cfg, progress_bar=False)
  rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,]+) tokens/s", log.getvalue())]
  return {"tokens_per_s": statistics.median(rates[2:])}  # not the first two intervals: they hold the warm-up


def hf_model(cfg, tokenizer_meta):
  """transformers' model of the same architecture as gptjax's `cfg`, randomly initialised, fp32."""
  import torch
  import transformers

  from gptjax import convert
  from gptjax import hf_llama
  torch.set_num_threads(os.cpu_count())
  hf = convert.hf_config(cfg, tokenizer_meta) if cfg.positions == "learned" else hf_llama.hf_config(cfg)
  hf.pop("architectures"), hf.pop("torch_dtype"), hf.pop("gptjax_tokenizer", None)
  torch.manual_seed(0)
  return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))


def torch_train(overrides, n_steps, data_dir, compiled):
  import torch

  from gptjax import data
  cfg = _model_config(overrides)
  meta = data.load_meta(data_dir)
  model = hf_model(dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]), meta["tokenizer"])
  decay = [p for p in model.parameters() if p.dim() >= 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.99))
  forward = torch.compile(model) if compiled else model
  batches = data.TokenBatches(data.load_tokens(data_dir, "train"), batch_size=cfg.train.batch_size,
                              block_size=cfg.model.block_size, seed=0)
  rates, start = [], time.perf_counter()
  for step in range(1, n_steps + 1):
    inputs, targets = next(batches)
    logits = forward(torch.from_numpy(inputs[0])).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets[0]).long().flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if step % LOG_INTERVAL == 0:
      loss.item()
      rates.append(LOG_INTERVAL * inputs[0].size / (time.perf_counter() - start))
      start = time.perf_counter()
  return {"tokens_per_s": statistics.median(rates[2:])}  # as gptjax_train: the first two intervals warm up


def _timed(fn, repeats):
  """The median seconds of `repeats` calls of fn, after one call that warms up (compiles)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def gptjax_sample(overrides, batch, new_tokens, prompt_len, repeats):
  import jax
  import numpy as np

  from gptjax import model as model_lib
  from gptjax import sample
  cfg = _model_config(overrides).model
  params = model_lib.init_params(cfg, jax.random.key(0))
  prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)

  def generate(prompt, n):
    return lambda: sample.generate(cfg, params, prompt, max_new_tokens=n, rng=jax.random.key(0), temperature=0)
  seconds = _timed(generate(prompt[:, :16], new_tokens), repeats)
  return {"tokens_per_s": batch * new_tokens / seconds, "first_token_s": _timed(generate(prompt[:1], 1), repeats)}


def torch_sample(overrides, batch, new_tokens, prompt_len, repeats):
  import torch
  cfg = _model_config(overrides).model
  model = hf_model(cfg, {"kind": "gpt2"}).eval()
  model.generation_config.eos_token_id = model.generation_config.pad_token_id = None  # never stop early
  prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))

  def generate(prompt, n):
    return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True)
  with torch.inference_mode():
    seconds = _timed(generate(prompt[:, :16], new_tokens), repeats)
    first = _timed(generate(prompt[:1], 1), repeats)
  return {"tokens_per_s": batch * new_tokens / seconds, "first_token_s": first}


WORKERS = {"gptjax_train": gptjax_train, "torch_train": torch_train, "gptjax_sample": gptjax_sample,
           "torch_sample": torch_sample}


# ---- driver ----

def run_worker(name: str, *args) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "PYTHONPATH": str(ROOT)}
  result = subprocess.run([sys.executable, __file__, "--worker", name, json.dumps(args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
  if result.returncode != 0:
    raise RuntimeError(f"{name}{args} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(variants: dict, rounds: int) -> dict:
  """{name: [result per round]}; variants {name: (worker, args)} take turns, reversed every other round."""
  results = {name: [] for name in variants}
  for i in range(rounds):
    for name in (list(variants) if i % 2 == 0 else list(reversed(variants))):
      results[name].append(run_worker(*variants[name]))
  return results


def row(title: str, results: dict, key: str = "tokens_per_s") -> str:
  """gptjax's and each other's median, then gptjax's median ratio to each other, with the per-round ratios."""
  values = {name: [r[key] for r in rounds] for name, rounds in results.items()}
  ours = values.pop("gptjax")
  cells = [f"{statistics.median(ours):,.0f}"] + [f"{statistics.median(v):,.0f}" for v in values.values()]
  for other in values.values():
    per_round = [a / b for a, b in zip(ours, other)]
    cells.append(f"**{statistics.median(per_round):.2f}** ({', '.join(f'{r:.2f}' for r in per_round)})")
  return f"| {title} | " + " | ".join(cells) + " |"


def versions() -> str:
  import importlib.metadata as md
  return ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--only", choices=["train", "sample"], action="append")
  parser.add_argument("--compile", action="store_true", help="also torch.compile (training)")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes and one round: checks that the script works")
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(WORKERS[args.worker[0]](*json.loads(args.worker[1]))))
    return

  parts, rounds = args.only or ["train", "sample"], 1 if args.tiny else args.rounds
  print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{versions()}; {rounds} rounds, medians (per-round ratios)\n")
  with tempfile.TemporaryDirectory() as tmp:
    if "train" in parts:
      others = ["transformers eager"] + (["transformers compiled"] if args.compile else [])
      print("| train step, fp32 | gptjax tokens/s | " + " | ".join(f"{o} tokens/s" for o in others) + " | "
            + " | ".join(f"gptjax / {o}" for o in others) + " |\n" + "|---" * (2 + 2 * len(others)) + "|", flush=True)
      for title, tokenizer, n_steps, overrides in TINY_TRAIN if args.tiny else TRAIN_SHAPES:
        data_dir = pathlib.Path(tmp) / tokenizer
        if not data_dir.exists():
          subprocess.run([sys.executable, "-m", "gptjax.cli", "prepare", "--tokenizer", tokenizer, "--out",
                          str(data_dir)], check=True, capture_output=True, cwd=ROOT)
        variants = {"gptjax": ("gptjax_train", overrides, n_steps, str(data_dir)),
                    "transformers eager": ("torch_train", overrides, n_steps, str(data_dir), False)}
        if args.compile:
          variants["transformers compiled"] = ("torch_train", overrides, n_steps, str(data_dir), True)
        print(row(title, alternate(variants, rounds)), flush=True)
      print()
    if "sample" in parts:
      model, new_tokens, prompt_len, repeats = (TINY_SAMPLE, 8, 32, 1) if args.tiny else (SAMPLE_MODEL, 256, 512, 3)
      print(f"| greedy sampling, {new_tokens} new tokens | gptjax tokens/s | transformers generate tokens/s | "
            "gptjax / generate |\n|---|---|---|---|", flush=True)
      first_token = {}
      for batch in (1, 8):
        variants = {"gptjax": ("gptjax_sample", model, batch, new_tokens, prompt_len, repeats),
                    "transformers": ("torch_sample", model, batch, new_tokens, prompt_len, repeats)}
        results = alternate(variants, rounds)
        print(row(f"batch {batch}", results), flush=True)
        first_token = {name: [r["first_token_s"] for r in rounds] for name, rounds in results.items()}
      print(f"\nfirst token of a {prompt_len}-token prompt, batch 1: gptjax "
            f"{statistics.median(first_token['gptjax']) * 1e3:.1f} ms, transformers "
            f"{statistics.median(first_token['transformers']) * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
