"""Training throughput and MFU on one accelerator, in bfloat16: gptjax's configs at the largest
batch that fits, its attention kernels and remat policies side by side, and PyTorch on the same
shapes.

    python benchmarks/accelerator.py              # on a GPU: at most --budget seconds (450), not yet run on one
    python benchmarks/accelerator.py --tiny       # the first rows, tiny shapes on a CPU: the script works

Rows (each in a process of its own, one after another; a row that fails says why and the rest go on):
`gpt2_124m` with the default kernel (`auto`: cuDNN on a GPU), then with XLA's attention, with remat
save_dots and full, and unrolled instead of scanned; a ~350M GPT-2 (24 x 1024) and `llama3_2_1b`
(1.24B); then transformers' GPT2LMHeadModel and LlamaForCausalLM of the same shapes with SDPA
attention (flash on a GPU), bf16 autocast, fused AdamW and `torch.compile`, at the batch gptjax
found. The largest batch: one compile at a small batch gives XLA's memory need per sequence, the
next the batch that fills 90% of the device. Tokens/s over 10 timed steps after 3 warm-up steps;
MFU from `gptjax.model.flops_per_token` and the device's peak (`gptjax.metrics.PEAK_FLOPS`).
Prints a markdown table; `--budget` seconds stop the run early (the rows left say so).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPT2_350M = ["model.n_layer=24", "model.n_embd=1024", "model.n_head=16"]
COMMON = ["model.vocab_multiple=128", "model.dtype=bfloat16", "train.device_batch_size=0", "train.grad_accum_steps=1"]
# (row, config, overrides): every row's model runs in bfloat16 with a vocabulary padded to 128.
ROWS = [
    ("gpt2_124m, attention auto, remat none, scanned", "gpt2_124m", ["model.scan_layers=true"]),
    ("gpt2_124m, attention xla", "gpt2_124m", ["model.scan_layers=true", "model.attention=xla"]),
    ("gpt2_124m, remat save_dots", "gpt2_124m", ["model.scan_layers=true", "model.remat=save_dots"]),
    ("gpt2_124m, remat full", "gpt2_124m", ["model.scan_layers=true", "model.remat=full"]),
    ("gpt2_124m, unrolled", "gpt2_124m", ["model.scan_layers=false"]),
    ("GPT-2 350M (24 x 1024), remat save_dots", "gpt2_124m", [*GPT2_350M, "model.scan_layers=true", "model.remat=save_dots"]),
    ("llama3_2_1b (1.24B), remat save_dots", "llama3_2_1b", ["model.vocab_size=128256"]),
]
TORCH_ROWS = {0: "torch: GPT-2 124M, SDPA", 6: "torch: Llama 3.2 1B shape, SDPA"}  # by the gptjax row whose shape and batch they take
# The most telling rows first: --budget cuts the tail.
ORDER = [("gptjax", 0), ("torch", 0), ("gptjax", 1), ("gptjax", 6), ("torch", 6), ("gptjax", 2), ("gptjax", 3),
         ("gptjax", 4), ("gptjax", 5)]
ROW_TIMEOUT = 180  # seconds for one row: compiles and 13 steps
TINY_ROWS = 3  # --tiny: a row of each worker and of a second kernel (each row compiles for 10 s on a 2-core CPU)
TINY = ["model.n_layer=1", "model.n_embd=64", "model.n_head=4", "model.block_size=128", "model.vocab_size=512",
        "model.n_kv_head=0", "model.head_dim=0", "model.mlp_hidden=0", "model.dtype=float32"]
WARMUP, TIMED = 3, 10  # steps


def _config(name: str, overrides: list[str], tiny: bool):
  from gptjax import config as config_lib  # noqa: PLC0415
  merged = {item.split("=")[0]: item for item in [*COMMON, *overrides, *(TINY if tiny else [])]}  # the last of each key
  return config_lib.load_config(name, list(merged.values()))


def _train_step(cfg, batch: int, mesh):
  """(the compiled train step at `batch`, its state shardings, bytes it needs on a device)."""
  import dataclasses  # noqa: PLC0415

  from gptjax import optim  # noqa: PLC0415
  from gptjax import steps as steps_lib  # noqa: PLC0415
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
  lowered, _, _, shardings = steps_lib.lower_steps(cfg, tx, schedule, mesh)
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  need = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return compiled, shardings, tx, need


def _largest_batch(cfg, mesh, limit: int | None, start: int):
  """(batch, compiled step, shardings, tx, bytes needed): the largest multiple of `start` whose
  step fits 90% of `limit` by XLA's memory analysis (`start` itself without a limit)."""
  compiled, shardings, tx, need = _train_step(cfg, start, mesh)
  if not limit:
    return start, compiled, shardings, tx, need
  _, _, _, need_double = _train_step(cfg, 2 * start, mesh)
  per_sequence = max(1, (need_double - need) / start)
  batch = max(start, int((0.9 * limit - (need - per_sequence * start)) / per_sequence) // start * start)
  while batch > start:
    compiled, shardings, tx, need = _train_step(cfg, batch, mesh)
    if need <= 0.9 * limit:
      break
    batch = max(start, int(batch * 0.85) // start * start)
  return batch, compiled, shardings, tx, need


def run_gptjax(index: int, tiny: bool) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from gptjax import metrics  # noqa: PLC0415
  from gptjax import model as model_lib  # noqa: PLC0415
  from gptjax import sharding  # noqa: PLC0415
  from gptjax import steps as steps_lib  # noqa: PLC0415
  from gptjax.config import TrainConfig  # noqa: PLC0415
  from gptjax.model import kernels  # noqa: PLC0415

  _, name, overrides = ROWS[index]
  cfg = _config(name, overrides, tiny)
  mesh = sharding.make_mesh(cfg.mesh)
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  start = 4 * sharding.batch_shards(mesh) if tiny else 8 * sharding.batch_shards(mesh)
  batch, step, shardings, tx, need = _largest_batch(cfg, mesh, limit, start)
  state = steps_lib.init_state(cfg.model, tx, shardings, 0)
  T = cfg.model.block_size
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (1, batch, T + 1), dtype=np.int32)
  inputs, targets = (sharding.put_batch(a, mesh) for a in (tokens[..., :-1], tokens[..., 1:]))
  for _ in range(WARMUP):
    state, out = step(state, inputs, targets)
  jax.block_until_ready(out)
  began = time.perf_counter()
  for _ in range(TIMED):
    state, out = step(state, inputs, targets)
  loss = float(jax.block_until_ready(out)["loss"])
  seconds = (time.perf_counter() - began) / TIMED
  tokens_per_s = batch * T / seconds
  peak = metrics.peak_flops_per_device(TrainConfig()) * jax.device_count()
  return {"params": model_lib.count_params(state.params), "batch": batch, "block": T, "tokens_per_s": tokens_per_s,
          "mfu": model_lib.flops_per_token(cfg.model) * tokens_per_s / peak if peak else None, "loss": loss,
          "attention": kernels.report(cfg.model, T).removeprefix("attention: "), "device": jax.devices()[0].device_kind,
          "memory_gib": need / 2**30}


def run_torch(index: int, batch: int, tiny: bool) -> dict:
  os.environ["JAX_PLATFORMS"] = "cpu"  # JAX only counts FLOPs here: it must not take the GPU's memory
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  from gptjax import metrics  # noqa: PLC0415
  from gptjax import model as model_lib  # noqa: PLC0415

  m = _config(ROWS[index][1], ROWS[index][2], tiny).model
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if m.positions == "learned":
    hf = transformers.GPT2Config(vocab_size=m.padded_vocab, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                                 n_head=m.n_head, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel._from_config(hf, attn_implementation="sdpa")
  else:
    hf = transformers.LlamaConfig(vocab_size=m.padded_vocab, hidden_size=m.n_embd, intermediate_size=m.mlp_size,
                                  num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads,
                                  head_dim=m.head_size, max_position_embeddings=m.block_size, rope_theta=m.rope_theta,
                                  tie_word_embeddings=m.tie_embeddings, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
  model.to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
  forward = model if tiny else torch.compile(model)  # --tiny: eager, a compile takes minutes on a CPU
  tokens = torch.randint(0, m.vocab_size, (batch, m.block_size + 1), device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
      loss = forward(tokens[:, :-1], labels=tokens[:, :-1]).loss  # transformers shifts the labels itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  for _ in range(WARMUP):
    step()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  sync()
  began = time.perf_counter()
  for _ in range(TIMED):
    loss = step()
  sync()
  seconds = (time.perf_counter() - began) / TIMED
  tokens_per_s = batch * m.block_size / seconds
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"  # CUDA's name is JAX's device kind
  peak = metrics.peak_flops(kind)
  return {"params": sum(p.numel() for p in model.parameters()), "batch": batch, "block": m.block_size,
          "tokens_per_s": tokens_per_s, "mfu": model_lib.flops_per_token(m) * tokens_per_s / peak if peak else None,
          "loss": float(loss.detach()), "attention": "SDPA" + ("" if tiny else ", torch.compile"),
          "device": kind, "memory_gib": None}


def _in_process(args: list[str], timeout: float) -> dict:
  """One row in a process of its own (its own accelerator memory), or with --tiny in this one."""
  if "--tiny" in args:
    index, batch = int(args[1]), int(args[3]) if args[0] == "--torch-row" else None
    try:
      return run_torch(index, batch, True) if args[0] == "--torch-row" else run_gptjax(index, True)
    except Exception as e:  # noqa: BLE001 (a row that fails says why; the rest go on)
      return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  try:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
  except subprocess.TimeoutExpired:
    return {"error": f"over {timeout:.0f} s"}
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": last[:200]}
  return json.loads(lines[-1])


def _row(name: str, r: dict) -> str:
  if "error" in r:
    return f"| {name} | failed: {r['error']} | | | | | |"
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  memory = "" if r["memory_gib"] is None else f"{r['memory_gib']:,.2f} GiB"
  return (f"| {name} | {r['params'] / 1e6:,.1f}M, batch {r['batch']} x {r['block']} | {r['tokens_per_s']:,.0f} | {mfu} "
          f"| {memory} | {r['attention']} | {r['loss']:.3f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny shapes in float32, torch eager: for a CPU")
  parser.add_argument("--budget", type=float, default=450, help="seconds; rows not started by then are skipped")
  parser.add_argument("--gptjax-row", type=int, help=argparse.SUPPRESS)  # a worker: one row, one JSON line
  parser.add_argument("--torch-row", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.gptjax_row is not None:
    print(json.dumps(run_gptjax(args.gptjax_row, args.tiny)))
    return
  if args.torch_row is not None:
    print(json.dumps(run_torch(args.torch_row, args.batch, args.tiny)))
    return

  began, results = time.monotonic(), {}
  tiny = ["--tiny"] if args.tiny else []
  print("| run | model, batch x context | tokens/s | MFU | memory (XLA) | attention | loss |")
  print("|---|---|---|---|---|---|---|")
  for kind, index in ORDER[:TINY_ROWS] if args.tiny else ORDER:
    left = min(args.budget - (time.monotonic() - began), ROW_TIMEOUT)
    if kind == "gptjax":
      name, worker = ROWS[index][0], ["--gptjax-row", str(index)]
    else:
      name, worker = TORCH_ROWS[index], ["--torch-row", str(index), "--batch", str(results.get(index, {}).get("batch", 8))]
    result = _in_process([*worker, *tiny], left) if left > 10 else {"error": "skipped: --budget"}
    results.setdefault(index, result)
    print(_row(name, result), flush=True)
  device = next((r["device"] for r in results.values() if "device" in r), "unknown")
  print(f"\ndevice: {device}; {time.monotonic() - began:.0f} s")

if __name__ == "__main__":
  main()
