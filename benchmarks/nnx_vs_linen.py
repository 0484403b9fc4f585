"""The NNX model of today against the Linen model of the commit before it, side by side on this
machine: train-step throughput, sampling speed, and train-step compile time against depth.

    python benchmarks/nnx_vs_linen.py                      # everything, 5 alternated rounds
    python benchmarks/nnx_vs_linen.py --rounds 3 --only train
    python benchmarks/nnx_vs_linen.py --tiny               # a 2-layer model, one round: the script works

Each measurement runs in a separate process; the two versions alternate within every round and
the table reports medians. The Linen code is taken from git (`--baseline`, default the last Linen
commit) into a temporary directory and imported from there. Prints markdown tables.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINEN_COMMIT = "43e429b"  # the last commit with the Flax Linen model

# (name, config, overrides, steps): the two CPU shapes of the issue. shakespeare_char runs with
# batch 8 instead of 64 so that a round takes seconds, not minutes, on a 2-core CPU.
TRAIN_CASES = [
    ("shakespeare_char_cpu (4x128, ctx 64, batch 12)", "shakespeare_char_cpu", [], 160),
    ("shakespeare_char (6x384, ctx 256, batch 8, dropout 0.2)", "shakespeare_char", ["train.batch_size=8"], 30),
]
SAMPLE_CASES = [("6x384, ctx 256, 200 new tokens, batch 1", 1), ("6x384, ctx 256, 200 new tokens, batch 8", 8)]
DEPTHS = (4, 12, 24, 48)
TINY_MODEL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32"]


# ---- workers: run inside one version's tree, print one JSON line ----

def _is_nnx():
  from gptjax import model
  return hasattr(model, "bind")


def worker_train(config, overrides, steps, data_dir, variant):
  import contextlib
  import io

  from gptjax import config as config_lib
  from gptjax import train
  with tempfile.TemporaryDirectory() as out:
    cfg = config_lib.load_config(config, [*overrides, *variant, f"data.dir={data_dir}", f"train.out_dir={out}",
                                          f"train.max_iters={steps}", "train.log_interval=10",
                                          "train.eval_interval=1000000", "train.checkpoint_interval=1000000",
                                          "train.eval_iters=1"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
      train.train(cfg, progress_bar=False)
  rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,]+) tokens/s", log.getvalue())]
  return {"tokens_per_s": statistics.median(rates[1:])}  # not the first interval: it holds the warm-up


def worker_sample(batch, variant):
  import jax
  import numpy as np

  from gptjax import config as config_lib
  from gptjax import model as model_lib
  from gptjax import sample
  cfg = config_lib.load_config("shakespeare_char", ["model.vocab_size=77", *variant]).model
  params = model_lib.init_params(cfg, jax.random.key(0))
  if not _is_nnx():
    import flax.linen as nn
    params = nn.meta.unbox(params)
  prompt = np.zeros((batch, 1), np.int32)
  times = []
  for _ in range(6):  # the first includes compilation
    start = time.perf_counter()
    sample.generate(cfg, params, prompt, max_new_tokens=200, rng=jax.random.key(0), temperature=0)
    times.append(time.perf_counter() - start)
  return {"tokens_per_s": 200 * batch / statistics.median(times[1:])}


def worker_compile(n_layer, scan):
  import jax
  import jax.numpy as jnp

  from gptjax import config as config_lib
  from gptjax import optim
  from gptjax import sharding
  cfg = config_lib.load_config("shakespeare_char_cpu", [
      f"model.n_layer={n_layer}", "model.n_embd=64", "model.vocab_size=77", f"model.scan_layers={scan}"]
      if _is_nnx() else [f"model.n_layer={n_layer}", "model.n_embd=64", "model.vocab_size=77"])
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  if _is_nnx():
    from gptjax import steps
    step_fn = steps.make_train_step(cfg.model, tx, schedule, 0)
    abstract, shardings = steps.state_shardings(cfg.model, tx, mesh)
  else:
    from gptjax import model as model_lib
    from gptjax import train
    step_fn = train.make_train_step(model_lib.GPT(cfg.model), tx, schedule, 0)
    abstract, shardings = train.state_shardings(cfg, tx, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  batch = jax.ShapeDtypeStruct((1, cfg.train.batch_size, cfg.model.block_size), jnp.int32)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    jax.jit(step_fn, donate_argnums=0).lower(abstract, batch, batch).compile()
  return {"seconds": time.perf_counter() - start}


# ---- driver ----

def run_worker(tree: pathlib.Path, *args) -> dict:
  """One measurement in a fresh process that imports gptjax from `tree`."""
  env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  result = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], env=env, cwd=tree,
                          capture_output=True, text=True, timeout=1800)
  if result.returncode != 0:
    raise RuntimeError(f"worker {args} in {tree} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(variants: dict, rounds: int, *args) -> dict:
  """{variant: [measurement per round]}; the variants, (tree, config overrides), take turns inside
  every round, in reversed order every other round."""
  results = {name: [] for name in variants}
  for i in range(rounds):
    for name in (list(variants) if i % 2 == 0 else list(reversed(variants))):
      tree, overrides = variants[name]
      results[name].append(run_worker(tree, *args, json.dumps(overrides)))
  return results


def print_rates(title: str, results: dict) -> None:
  """A table row: each variant's median tokens/s, then each NNX variant's median per-round ratio to Linen."""
  rates = {name: [r["tokens_per_s"] for r in rows] for name, rows in results.items()}
  ratios = [statistics.median(n / l for n, l in zip(rates[name], rates["Linen"])) for name in rates if name != "Linen"]
  spread = {name: ", ".join(f"{n / l:.2f}" for n, l in zip(rates[name], rates["Linen"])) for name in rates if name != "Linen"}
  print(f"| {title} | " + " | ".join(f"{statistics.median(r):,.0f}" for r in rates.values()) + " | "
        + " | ".join(f"{r:.3f}" for r in ratios) + " |  " + "; ".join(f"{k}: {v}" for k, v in spread.items()), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--baseline", default=LINEN_COMMIT, help="the git revision with the Linen model")
  parser.add_argument("--only", choices=["train", "sample", "compile"], action="append")
  parser.add_argument("--tiny", action="store_true", help="a 2-layer model and one round: checks that the script works")
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  global TRAIN_CASES, SAMPLE_CASES, DEPTHS
  if args.tiny:
    args.rounds, DEPTHS = 1, (2,)
    TRAIN_CASES = [("tiny (2x32, ctx 32, batch 12)", "shakespeare_char_cpu", [], 21)]  # the model: the variants' overrides
    SAMPLE_CASES = [("tiny (2x32, ctx 32), batch 1", 1)]
  if args.worker:
    kind, *rest = args.worker
    if kind == "which":
      import gptjax
      print(json.dumps({"file": gptjax.__file__}))
      return
    worker = {"train": lambda c, o, s, d, v: worker_train(c, json.loads(o), int(s), d, json.loads(v)),
              "sample": lambda b, v: worker_sample(int(b), json.loads(v)),
              "compile": lambda n, s: worker_compile(int(n), s == "True")}[kind]
    print(json.dumps(worker(*rest)))
    return

  parts = args.only or ["train", "sample", "compile"]
  with tempfile.TemporaryDirectory() as tmp:
    linen = pathlib.Path(tmp) / "linen"
    linen.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(linen)], input=archive, check=True)
    for tree in (linen, ROOT):  # each version imports its own code
      assert run_worker(tree, "which")["file"].startswith(str(tree)), tree
    data_dir = pathlib.Path(tmp) / "data"
    subprocess.run([sys.executable, "-m", "gptjax.cli", "prepare", "--out", str(data_dir)], check=True,
                   capture_output=True, cwd=ROOT)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, baseline {args.baseline}, {args.rounds} rounds, medians\n")

    tiny = TINY_MODEL if args.tiny else []
    variants = {"Linen": (linen, tiny), "NNX scanned": (ROOT, ["model.scan_layers=true", *tiny]),
                "NNX unrolled": (ROOT, ["model.scan_layers=false", *tiny])}
    header = " | ".join(f"{name} tokens/s" for name in variants) + " | scanned / Linen | unrolled / Linen |"
    if "train" in parts:
      print(f"| train step | {header}\n|---|---|---|---|---|---|")
      for title, config, overrides, n_steps in TRAIN_CASES:
        print_rates(title, alternate(variants, args.rounds, "train", config, json.dumps(overrides), n_steps, data_dir))
      print()
    if "sample" in parts:
      print(f"| greedy sampling | {header}\n|---|---|---|---|---|---|")
      for title, batch in SAMPLE_CASES:
        print_rates(title, alternate(variants, args.rounds, "sample", batch))
      print()

    if "compile" in parts:
      print("| train-step compile, 64 wide | Linen (unrolled) s | NNX unrolled s | NNX scanned s |\n|---|---|---|---|")
      rounds = max(1, args.rounds // 2)
      for depth in DEPTHS:
        linen_s = statistics.median(run_worker(linen, "compile", depth, False)["seconds"] for _ in range(rounds))
        unrolled = statistics.median(run_worker(ROOT, "compile", depth, False)["seconds"] for _ in range(rounds))
        scanned = statistics.median(run_worker(ROOT, "compile", depth, True)["seconds"] for _ in range(rounds))
        print(f"| {depth} layers | {linen_s:.1f} | {unrolled:.1f} | {scanned:.1f} |", flush=True)


if __name__ == "__main__":
  main()
