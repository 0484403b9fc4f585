"""The CPU demo's training speed (`gptjax train shakespeare_char_cpu`, what `scripts/demo.sh`
runs) from two or more source trees side by side: tokens/s as the run logs it; with `--val`, the
validation loss each run ends with too.

    python benchmarks/demo_speed.py --trees /tmp/old .          # e.g. a worktree of an older commit
    python benchmarks/demo_speed.py --trees . --steps 60 --rounds 1
    python benchmarks/demo_speed.py --variants "" "optim.name=muon" "data.order=random" --data out/recipe/bpe
    python benchmarks/demo_speed.py --config llama_shakespeare_cpu --steps 2000 --val \
        --variants "" "model.n_experts=8 model.experts_per_token=2 model.expert_hidden=192"  # = moe_shakespeare_cpu

Each run is a separate process with its compilation cache off; the trees (and, on each, the
`--variants`: overrides, "" for none) alternate within every round. A run's figure is the median
of its log lines' tokens/s (over `train.log_interval=20` steps), the first left out; the table
gives the median over rounds and each round's ratio to the first tree. With `--val`, round r
trains with seed 1337 + r and evaluates once at the end (the config's eval_iters); the table adds
the validation losses' mean and standard deviation over the rounds.
"""

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(tree: pathlib.Path, config: str, data: pathlib.Path, out: pathlib.Path, steps: int, variant: str,
         seed: int | None) -> tuple[float, float | None]:
  """(tokens/s, the validation loss at the end where `seed` is given, else None)."""
  env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": ""}
  env.pop("XLA_FLAGS", None)
  evaluation = [f"train.eval_interval={steps}", f"train.seed={seed}"] if seed is not None else \
      ["train.eval_interval=100000", "train.eval_iters=2"]
  run = subprocess.run([sys.executable, "-m", "gptjax.cli", "train", config, f"data.dir={data}",
                        f"train.out_dir={out}", f"train.max_iters={steps}", "train.log_interval=20",
                        "train.checkpoint_interval=100000", *evaluation, "train.sample_tokens=0", *variant.split(),
                        "--no-progress"], capture_output=True, text=True, env=env, cwd=tree)
  if run.returncode:
    raise SystemExit(f"{tree}: {run.stderr[-2000:]}")
  rates = [float(m.replace(",", "")) for m in re.findall(r"([\d,.]+) tokens/s", run.stdout)]
  val = re.findall(r"val loss ([\d.]+)", run.stdout)
  return statistics.median(rates[1:]), float(val[-1]) if seed is not None else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trees", nargs="+", default=[str(ROOT)])
  parser.add_argument("--config", default="shakespeare_char_cpu", help="a named config on the built-in characters")
  parser.add_argument("--val", action="store_true", help="a seed per round, and the validation loss at the end")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--variants", nargs="+", default=[""], help="overrides per variant ('' for none)")
  parser.add_argument("--data", default=None, help="a prepared folder (default: the built-in Shakespeare, characters)")
  args = parser.parse_args()
  trees = [pathlib.Path(t).resolve() for t in args.trees]
  runs = [(tree, variant) for tree in trees for variant in args.variants]
  with tempfile.TemporaryDirectory() as tmp:
    data = pathlib.Path(args.data).resolve() if args.data else pathlib.Path(tmp) / "data"
    if not args.data:
      subprocess.run([sys.executable, "-m", "gptjax.cli", "prepare", "--input", "builtin:shakespeare", "--tokenizer",
                      "char", "--out", str(data)], check=True, capture_output=True, cwd=trees[0],
                     env={**os.environ, "PYTHONPATH": str(trees[0])})
    rates, losses = {run: [] for run in runs}, {run: [] for run in runs}
    for round_ in range(args.rounds):
      for i, (tree, variant) in enumerate(runs):
        rate, loss = _run(tree, args.config, data, pathlib.Path(tmp) / f"out-{round_}-{i}", args.steps, variant,
                          1337 + round_ if args.val else None)
        rates[(tree, variant)].append(rate)
        losses[(tree, variant)].append(loss)
  val = " val loss (mean ± std over seeds) |" if args.val else ""
  print(f"| tree | variant | tokens/s (median) | ratio to the first (per round) |{val}")
  print("|---|---|---|---|" + "---|" * args.val)
  for run in runs:
    ratios = [r / f for r, f in zip(rates[run], rates[runs[0]])]
    spread = statistics.stdev(losses[run]) if len(losses[run]) > 1 else 0.0
    print(f"| {run[0]} | {run[1] or '-'} | {statistics.median(rates[run]):,.0f} | {statistics.median(ratios):.2f} "
          f"({', '.join(f'{r:.2f}' for r in ratios)}) |"
          + (f" {statistics.mean(losses[run]):.4f} ± {spread:.4f} ({', '.join(f'{v:.4f}' for v in losses[run])}) |"
             if args.val else ""))


if __name__ == "__main__":
  main()
