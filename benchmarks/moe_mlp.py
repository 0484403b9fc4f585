"""The routed MLP's cost: a mixture-of-experts MLP (forward and backward) against a dense SwiGLU
MLP of the same active size (hidden = experts_per_token x the experts' hidden), and the grouped
matmul's two kernels (`model.moe_matmul`: tiled, ragged_dot) on this machine.

    python benchmarks/moe_mlp.py            # moe_shakespeare_cpu's MLP at its batch, and a wider one
    python benchmarks/moe_mlp.py --tiny     # that it runs

Each case is timed in this process, the variants alternating in every round; medians over the
rounds of the mean over `--steps` calls.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gptjax import config as config_lib  # noqa: E402
from gptjax.model.mlp import MLP  # noqa: E402
from gptjax.model.moe import MoE  # noqa: E402


def _step(layer: nnx.Module, moe: bool):
  graphdef, params = nnx.split(layer)

  def loss(params, x_BTD):
    out = nnx.merge(graphdef, params)(x_BTD, None)
    return jnp.mean(jnp.square(out[0] if moe else out))

  return jax.jit(jax.value_and_grad(loss)), params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args()
  base = config_lib.load_config("moe_shakespeare_cpu", []).model
  cases = {"moe_shakespeare_cpu (768 tokens, D 128, 8 x 192, top-2)": (base, 12, 64),
           "wider (4,096 tokens, D 256, 16 x 256, top-2)": (dataclasses.replace(
               base, n_embd=256, n_experts=16, expert_hidden=256), 16, 256)}
  if args.tiny:
    cases = {"tiny (64 tokens, D 32, 4 x 16, top-2)": (dataclasses.replace(
        base, n_embd=32, n_experts=4, expert_hidden=16), 2, 32)}
  rounds, steps = (1, 2) if args.tiny else (args.rounds, args.steps)
  print("| case | variant | ms per forward + backward | ratio to dense |")
  print("|---|---|---|---|")
  for name, (cfg, batch, length) in cases.items():
    dense = dataclasses.replace(cfg, n_experts=0, mlp_hidden=cfg.experts_per_token * cfg.expert_size)
    variants = {"dense SwiGLU, same active size": (MLP(dense, rngs=nnx.Rngs(0)), False),
                **{f"routed, moe_matmul={kernel}": (MoE(dataclasses.replace(cfg, moe_matmul=kernel), rngs=nnx.Rngs(0)), True)
                   for kernel in ("tiled", "ragged_dot")}}
    x_BTD = jax.random.normal(jax.random.key(0), (batch, length, cfg.n_embd))
    compiled = {variant: _step(layer, moe) for variant, (layer, moe) in variants.items()}
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
      for variant, (fn, params) in compiled.items():
        jax.block_until_ready(fn(params, x_BTD))
        start = time.perf_counter()
        for _ in range(steps):
          result = fn(params, x_BTD)
        jax.block_until_ready(result)
        times[variant].append((time.perf_counter() - start) / steps * 1e3)
    dense_ms = statistics.median(times["dense SwiGLU, same active size"])
    for variant, measured in times.items():
      ms = statistics.median(measured)
      print(f"| {name} | {variant} | {ms:.2f} | {ms / dense_ms:.2f} |")


if __name__ == "__main__":
  main()
