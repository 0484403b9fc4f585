"""The routed MLP's cost: a mixture-of-experts MLP (forward and backward) against a dense SwiGLU
MLP of the same active size (hidden = experts_per_token x the experts' hidden), and the experts'
two kernels (`model.moe_matmul`: tiled, ragged_dot) on this machine.

    python benchmarks/moe_mlp.py            # moe_shakespeare_cpu's MLP at its batch, and a wider one
    python benchmarks/moe_mlp.py --tiny     # that it runs

Each (case, variant) is timed in a process of its own, the variants alternating in every round;
a process's figure is the mean over `--steps` calls after one to compile; the table gives the
median over rounds and the median of each round's ratio to the dense MLP.
"""

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CASES = {"moe_shakespeare_cpu (768 tokens, D 128, 8 x 192, top-2)": (dict(), 12, 64),
         "wider (4,096 tokens, D 256, 16 x 256, top-2)": (dict(n_embd=256, n_experts=16, expert_hidden=256), 16, 256),
         "tiny (64 tokens, D 32, 4 x 16, top-2)": (dict(n_embd=32, n_experts=4, expert_hidden=16), 2, 32)}
VARIANTS = ("dense SwiGLU, same active size", "routed, moe_matmul=tiled", "routed, moe_matmul=ragged_dot")


def time_one(case: str, variant: str, steps: int) -> float:
  """ms per forward + backward of one variant, in this process."""
  sys.path.insert(0, ROOT)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from gptjax import config as config_lib  # noqa: PLC0415
  from gptjax.model.mlp import MLP  # noqa: PLC0415
  from gptjax.model.moe import MoE  # noqa: PLC0415

  changes, batch, length = CASES[case]
  cfg = dataclasses.replace(config_lib.load_config("moe_shakespeare_cpu", []).model, **changes)
  if variant.startswith("dense"):
    layer, routed = MLP(dataclasses.replace(cfg, n_experts=0, mlp_hidden=cfg.experts_per_token * cfg.expert_size),
                        rngs=nnx.Rngs(0)), False
  else:
    layer, routed = MoE(dataclasses.replace(cfg, moe_matmul=variant.split("=")[1]), rngs=nnx.Rngs(0)), True
  graphdef, params = nnx.split(layer)

  def loss(params, x_BTD):
    out = nnx.merge(graphdef, params)(x_BTD, None)
    return jnp.mean(jnp.square(out[0] if routed else out))

  step = jax.jit(jax.value_and_grad(loss))
  x_BTD = jax.random.normal(jax.random.key(0), (batch, length, cfg.n_embd))
  jax.block_until_ready(step(params, x_BTD))
  start = time.perf_counter()
  for _ in range(steps):
    result = step(params, x_BTD)
  jax.block_until_ready(result)
  return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)  # a measuring process
  args = parser.parse_args()
  if args.one:
    print(time_one(*args.one, args.steps))
    return
  cases = [case for case in CASES if case.startswith("tiny") == args.tiny]
  rounds, steps = (1, 2) if args.tiny else (args.rounds, args.steps)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": ""}
  times = {(case, variant): [] for case in cases for variant in VARIANTS}
  for _ in range(rounds):
    for case, variant in times:
      run = subprocess.run([sys.executable, __file__, "--one", case, variant, "--steps", str(steps)],
                           capture_output=True, text=True, env=env, check=True)
      times[(case, variant)].append(float(run.stdout.split()[-1]))
  print("| case | variant | ms per forward + backward | ratio to dense (per round) |")
  print("|---|---|---|---|")
  for case, variant in times:
    ratios = [t / d for t, d in zip(times[(case, variant)], times[(case, VARIANTS[0])])]
    print(f"| {case} | {variant} | {statistics.median(times[(case, variant)]):.2f} | {statistics.median(ratios):.2f} "
          f"({', '.join(f'{r:.2f}' for r in ratios)}) |")


if __name__ == "__main__":
  main()
