"""What each optimizer adds to a train step on an FSDP mesh, read from XLA: the step's FLOPs and
bytes per device (`cost_analysis`), its collectives by kind, the optimizer state per device and
the step's temporary memory. Muon's Newton-Schulz iterations run on matrices split over the mesh:
how many collectives and FLOPs that costs is what this measures.

    python benchmarks/optimizer_cost.py                                # gpt2_124m, 8 x 1024, fsdp=8
    python benchmarks/optimizer_cost.py --config llama3_2_1b --overrides model.n_layer=2
    python benchmarks/optimizer_cost.py --tiny                         # that it runs

The steps are compiled for this machine's CPU, 8 simulated devices (XLA's SPMD partitioner, the
same that partitions for GPUs and TPUs); nothing runs.
"""

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gptjax import config as config_lib  # noqa: E402
from gptjax import lower  # noqa: E402
from gptjax import metrics  # noqa: E402
from gptjax import optim  # noqa: E402
from gptjax import sharding  # noqa: E402
from gptjax import steps as steps_lib  # noqa: E402

OPTIMIZERS = ("adamw", "muon", "lion", "adafactor")


def measure(cfg: config_lib.Config, mesh) -> dict:
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
  train_step, _, abstract, shardings = steps_lib.lower_steps(cfg, tx, schedule, mesh)
  compiled = train_step.compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  sizes = metrics.memory_per_device(abstract, shardings, compiled)
  return {"flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0),
          "collectives": lower.collectives(compiled.as_text()), "sizes": sizes}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="gpt2_124m")
  parser.add_argument("--overrides", nargs="*", default=[])
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args()
  shape = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128"] if args.tiny else []
  base = ["train.batch_size=8", "train.device_batch_size=1", "train.grad_accum_steps=0", "mesh.data=1", "mesh.fsdp=8",
          "model.vocab_size=50304", *shape, *args.overrides]
  mesh = sharding.make_mesh(config_lib.load_config(args.config, base).mesh, jax.devices()[:8])
  rows = {name: measure(config_lib.load_config(args.config, [*base, f"optim.name={name}"]), mesh) for name in OPTIMIZERS}
  adamw = rows["adamw"]
  print(f"{args.config} {' '.join(base)} on 8 CPU devices (XLA's figures per device)\n")
  print("| optimizer | GFLOP per step | / AdamW's | GB accessed | optimizer state MiB | gradients and activations MiB | collectives |")
  print("|---|---|---|---|---|---|---|")
  for name, row in rows.items():
    collectives = ", ".join(f"{kind} x{n}" for kind, n in sorted(row["collectives"].items())) or "none"
    print(f"| {name} | {row['flops'] / 1e9:,.1f} | {row['flops'] / adamw['flops']:.3f} | {row['bytes'] / 1e9:,.2f} | "
          f"{row['sizes'].get('optimizer state', 0) / 2**20:,.1f} | {row['sizes']['gradients and activations'] / 2**20:,.1f} | "
          f"{collectives} |")


if __name__ == "__main__":
  main()
