"""Start-up: time from launch to the first train step, and the time of `gptjax sample` and
`gptjax perplexity`, each with an empty compilation cache (cold) and then again with the cache the
cold run filled (warm); and the count of XLA compilations in each.

    python benchmarks/startup.py                    # every case, 2 rounds
    python benchmarks/startup.py --cases tiny,deep  # 4 x 64 and 48 x 64 only
    python benchmarks/startup.py --source /tmp/old --no-cache  # another tree's gptjax, uncached
    python benchmarks/startup.py --tiny             # that the script runs: one small case, 1 round

Every run is a separate `gptjax` process on one CPU device, with its own output folder; cold and
warm alternate within each round. The "to step 1" runs are stopped once they log step 1. Prints a markdown
table: medians over the rounds.
"""

import argparse
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# gptjax's CLI in a process that counts XLA compilations (cache misses included, hits not) and
# persistent-cache hits, and prints them last.
COUNTING = """
import atexit, sys
from gptjax import cli
try:
  from gptjax import compile_cache
  compile_cache.set_defaults()
except ImportError:  # a source tree from before the cache
  pass
from jax import monitoring
counts = {"compiled": 0, "cache hits": 0}
def on_event(name, **_):
  counts["cache hits"] += name == "/jax/compilation_cache/cache_hits"
def on_duration(name, secs, **_):
  counts["compiled"] += name == "/jax/core/compile/backend_compile_duration"
monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
atexit.register(lambda: print("COUNTS", counts["compiled"] - counts["cache hits"], counts["cache hits"], flush=True))
cli.main(sys.argv[1:])
"""
TRAIN = ["train.max_iters=2", "train.log_interval=1", "train.eval_iters=2", "--no-progress"]
TINY = ["train", "shakespeare_char_cpu", "model.n_layer=4", "model.n_embd=64", "data.dir={data}"]
CASES = {  # name: (what, gptjax arguments with {data}, {bpe}, {demo} and {page}, whether it stops at step 1)
    "tiny": ("train 4 x 64 (0.2M parameters), to step 1", [*TINY, *TRAIN], True),
    "deep": ("train 48 x 64, to step 1",
             ["train", "shakespeare_char_cpu", "model.n_layer=48", "model.n_embd=64", "data.dir={data}", *TRAIN], True),
    "gpt2": ("train gpt2_124m (batch 1 x 1024), to step 1",
             ["train", "gpt2_124m", "data.dir={bpe}", "train.batch_size=1", "train.grad_accum_steps=1",
              "train.device_batch_size=0", *TRAIN], True),
    "onestep": ("train 4 x 64, a whole one-step run (evaluation, sample, save)",
                [*TINY, "train.max_iters=1", "train.eval_iters=2", "--no-progress"], False),
    "sample": ("gptjax sample, 100 tokens, demo checkpoint",
               ["sample", "--checkpoint", "{demo}", "--prompt", "ROMEO:", "--max-new-tokens", "100"], False),
    "perplexity": ("gptjax perplexity --split val, demo checkpoint",
                   ["perplexity", "--checkpoint", "{demo}", "--split", "val"], False),
    "perplexity_page": ("gptjax perplexity --text (a page: 3,000 characters), demo checkpoint",
                        ["perplexity", "--checkpoint", "{demo}", "--text", "{page}"], False),
}


def _run(args: list[str], cache: str, source: pathlib.Path, stop_at_step: bool) -> tuple[float, int | None, int | None]:
  """(seconds to `step 1:` (stop_at_step), else to exit; compilations; cache hits) of one process."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(source)}
  env.pop("XLA_FLAGS", None)
  start = time.perf_counter()
  process = subprocess.Popen([sys.executable, "-c", COUNTING, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=source, start_new_session=True)
  counts, output, seconds = (None, None), [], None
  for line in process.stdout:
    output.append(line)
    if stop_at_step and line.startswith("step 1:"):
      seconds = time.perf_counter() - start
      os.killpg(process.pid, signal.SIGKILL)  # what comes after the first step is not measured
      break
    if line.startswith("COUNTS"):
      counts = tuple(int(n) for n in line.split()[1:])
  process.wait()
  if seconds is None:
    if process.returncode:
      raise SystemExit(f"{' '.join(args)} failed:\n{''.join(output[-20:])}")
    seconds = time.perf_counter() - start
  return seconds, *counts


def _prepare(work: pathlib.Path, source: pathlib.Path, cases: list[str]) -> dict:
  paths = {"data": work / "char", "bpe": work / "bpe", "demo": work / "demo", "page": work / "page.txt"}
  paths["page"].write_text((source / "gptjax" / "assets" / "shakespeare.txt").read_text()[:3000])
  env = {**os.environ, "PYTHONPATH": str(source), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": ""}
  env.pop("XLA_FLAGS", None)

  def gptjax(*args):
    subprocess.run([sys.executable, "-m", "gptjax.cli", *map(str, args)], check=True, env=env, cwd=source,
                   stdout=subprocess.DEVNULL)

  gptjax("prepare", "--input", "builtin:shakespeare", "--tokenizer", "char", "--out", paths["data"])
  if "gpt2" in cases:
    gptjax("prepare", "--input", "builtin:shakespeare", "--tokenizer", "gpt2", "--out", paths["bpe"])
  if {"sample", "perplexity", "perplexity_page"} & set(cases):  # the demo's model, briefly trained
    gptjax("train", "shakespeare_char_cpu", f"data.dir={paths['data']}", f"train.out_dir={paths['demo']}",
           "train.max_iters=20", "train.eval_iters=2", "train.sample_tokens=0", "--no-progress")
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--source", default=str(ROOT), help="the source tree whose gptjax runs")
  parser.add_argument("--no-cache", action="store_true", help="no compilation cache (warm is then cold again)")
  parser.add_argument("--tiny", action="store_true", help="the tiny case, one round")
  args = parser.parse_args()
  cases = ["tiny"] if args.tiny else args.cases.split(",")
  rounds = 1 if args.tiny else args.rounds
  source = pathlib.Path(args.source).resolve()
  legacy = not (source / "gptjax" / "compile_cache.py").exists()  # from before train.device_batch_size
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    paths = _prepare(work, source, cases)  # folders named by the cases' {data}, {bpe}, {demo}, {page}
    results = {case: {"cold": [], "warm": []} for case in cases}
    for round_ in range(rounds):
      for case in cases:
        cache = "" if args.no_cache else str(work / f"cache-{case}-{round_}")
        for kind in ("cold", "warm"):
          out = work / f"out-{case}-{round_}-{kind}"
          _, template, stop_at_step = CASES[case]
          argv = [a.format(**paths) for a in template if not (legacy and a.startswith("train.device_batch_size"))]
          argv += [f"train.out_dir={out}"] if template[0] == "train" else []
          results[case][kind].append(_run(argv, cache, source, stop_at_step))
  print("| case | cold s | warm s | warm / cold | compilations cold | warm: compiled, cache hits |")
  print("|---|---|---|---|---|---|")
  for case in cases:
    cold, warm = (statistics.median(r[0] for r in results[case][k]) for k in ("cold", "warm"))
    cold_compiled = results[case]["cold"][-1][1]
    warm_compiled, warm_hits = results[case]["warm"][-1][1:]
    counts = "n/a (stopped)" if cold_compiled is None else cold_compiled
    warm_counts = "n/a (stopped)" if warm_compiled is None else f"{warm_compiled}, {warm_hits}"
    print(f"| {CASES[case][0]} | {cold:.1f} | {warm:.1f} | {warm / cold:.2f} | {counts} | {warm_counts} |")


if __name__ == "__main__":
  main()
