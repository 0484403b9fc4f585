"""XLA's temporary memory per device for one compiled train step (gradients, activations and the
logits): what the chunked LM head and cross-entropy (`model.loss_chunk`) save, against the whole
[B, T, vocab] float32 logits. Compiled for 8 simulated CPU devices, nothing run.

    python benchmarks/loss_memory.py                                  # qwen3_0_6b at 16 x 2048
    python benchmarks/loss_memory.py --config llama3_2_1b --vocab 128256
    PYTHONPATH=/tmp/old python benchmarks/loss_memory.py --before     # a tree from before the chunks

Each variant compiles in a process of its own. Prints a markdown table; CPU's buffer assignment is
close to, not the same as, a GPU's.
"""

import argparse
import json
import os
import subprocess
import sys

BATCH, CONTEXT = 16, 2048
# One micro-step of BATCH sequences; 8 devices sharding everything over fsdp, as the big configs do.
COMMON = [f"train.batch_size={BATCH}", f"model.block_size={CONTEXT}", "mesh.data=1", "mesh.fsdp=-1"]


def measure(config: str, vocab: int, overrides: list[str]) -> dict:
  """{"temp", "logits"}: bytes per device of the step's temporaries and of its whole float32 logits."""
  import dataclasses  # noqa: PLC0415 (in the child process, after XLA_FLAGS)
  import jax  # noqa: PLC0415
  from gptjax import config as config_lib  # noqa: PLC0415
  from gptjax import metrics, optim, sharding  # noqa: PLC0415
  from gptjax import steps as steps_lib  # noqa: PLC0415

  cfg = config_lib.load_config(config, overrides)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
  mesh = sharding.make_mesh(cfg.mesh)
  steps = steps_lib.compile_steps(cfg, optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim), mesh)
  temp = metrics.memory_per_device(steps.abstract, steps.shardings, steps.train)["gradients and activations"]
  return {"temp": temp, "logits": BATCH * CONTEXT * cfg.model.padded_vocab * 4 // jax.device_count()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="qwen3_0_6b")
  parser.add_argument("--vocab", type=int, default=151669, help="the tokenizer's vocabulary (Qwen3's)")
  parser.add_argument("--before", action="store_true",
                      help="one row for a gptjax from before model.loss_chunk and train.device_batch_size")
  parser.add_argument("--measure", help=argparse.SUPPRESS)  # a child process: JSON overrides
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.config, args.vocab, json.loads(args.measure))))
    return
  variants = ({"before the chunks (whole logits)": [*COMMON, "train.grad_accum_steps=1"]} if args.before else {
      "model.loss_chunk=0 (whole logits)": [*COMMON, "train.device_batch_size=0", "model.loss_chunk=0"],
      "model.loss_chunk=512 (the default)": [*COMMON, "train.device_batch_size=0"],
      "model.loss_chunk=256": [*COMMON, "train.device_batch_size=0", "model.loss_chunk=256"]})
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  print(f"`{args.config}`, vocabulary {args.vocab}, {BATCH} x {CONTEXT} per micro-step, 8 CPU devices (fsdp=8)\n")
  print("| variant | XLA temporaries / device | whole float32 logits / device |")
  print("|---|---|---|")
  for label, overrides in variants.items():
    child = subprocess.run([sys.executable, __file__, "--config", args.config, "--vocab", str(args.vocab),
                            "--measure", json.dumps(overrides)], capture_output=True, text=True, env=env, check=True)
    sizes = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"| {label} | {sizes['temp'] / 2**30:,.2f} GiB | {sizes['logits'] / 2**30:,.2f} GiB |")


if __name__ == "__main__":
  main()
