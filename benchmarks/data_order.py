"""The training windows' order: gptjax's shuffled epochs (`data.order=shuffled`, a Feistel
permutation computed per batch) and random draws (`random`) against Grain's `MapDataset` shuffle
over the same windows, on a memory-mapped token file: the loader's tokens/s, its start-up (import,
then construction and the first batch) and the size of the state a checkpoint keeps.

    python benchmarks/data_order.py                 # 1e9 tokens (a 2 GB sparse file), batches of 512 x 1024
    python benchmarks/data_order.py --tiny          # that it runs

Grain is not a dependency of gptjax: `pip install grain` to include it (left out if absent). Each
start-up is a fresh process that has already imported JAX (as `gptjax train` has); the batch
timings are medians over `--batches` batches, alternating the loaders.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from gptjax import data  # noqa: E402

STARTUP = """
import sys, time, json
import jax, numpy as np
sys.path.insert(0, {root!r})
start = time.perf_counter()
{body}
print(json.dumps(time.perf_counter() - start))
"""
BODIES = {
    "gptjax shuffled": """from gptjax import data
tokens = np.memmap({path!r}, np.uint16, "r")
data.TokenBatches(tokens, batch_size={batch}, block_size={block}, order="shuffled", seed=1).batch(0)""",
    "gptjax random": """from gptjax import data
tokens = np.memmap({path!r}, np.uint16, "r")
data.TokenBatches(tokens, batch_size={batch}, block_size={block}, order="random", seed=1).batch(0)""",
    "grain MapDataset": """import grain
tokens = np.memmap({path!r}, np.uint16, "r")
n = (len(tokens) - 1) // {block}
order = grain.MapDataset.range(n).shuffle(seed=1).repeat()
starts = np.asarray([order[i] for i in range({batch})]) * {block}
tokens[starts[:, None] + np.arange({block} + 1)]""",
}


def _grain_batches(tokens: np.ndarray, batch: int, block: int):
  import grain  # noqa: PLC0415
  n = (len(tokens) - 1) // block
  order = grain.MapDataset.range(n).shuffle(seed=1).repeat()
  offsets = np.arange(block + 1)
  return lambda step: tokens[np.asarray([order[step * batch + i] for i in range(batch)])[:, None] * block + offsets]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=float, default=1e9)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--block", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args()
  if args.tiny:
    args.tokens, args.batch, args.block, args.batches = 1e6, 8, 64, 3
  try:
    import grain  # noqa: F401, PLC0415
    has_grain = True
  except ImportError:
    has_grain = False
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "train.bin")
    with open(path, "wb") as f:  # sparse: the pages read are the windows' (zeros), as on a warm page cache
      f.truncate(int(args.tokens) * 2)
    tokens = np.memmap(path, np.uint16, "r")
    loaders = {
        "gptjax shuffled": data.TokenBatches(tokens, batch_size=args.batch, block_size=args.block, order="shuffled", seed=1).batch,
        "gptjax random": data.TokenBatches(tokens, batch_size=args.batch, block_size=args.block, order="random", seed=1).batch,
    }
    if has_grain:
      loaders["grain MapDataset"] = _grain_batches(tokens, args.batch, args.block)
    times = {name: [] for name in loaders}
    for step in range(args.batches):
      for name, batch in loaders.items():
        start = time.perf_counter()
        batch(step)
        times[name].append(time.perf_counter() - start)
    startup = {}
    for name in loaders:
      body = BODIES[name].format(path=path, batch=args.batch, block=args.block)
      out = subprocess.run([sys.executable, "-c", STARTUP.format(root=ROOT, body=body)], capture_output=True,
                           text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
      startup[name] = json.loads(out.stdout.strip().splitlines()[-1])
  state = len(json.dumps({"seed": 1, "step": 123456, "fingerprint": "0" * 32}))
  print(f"{args.tokens:.0e} tokens, batches of {args.batch} x {args.block}, median of {args.batches}\n")
  print("| loader | ms per batch | tokens/s | start-up s (import, build, first batch) | state kept |")
  print("|---|---|---|---|---|")
  for name, seconds in times.items():
    median = statistics.median(seconds)
    kept = f"{state} bytes (seed, step, fingerprint)" if name.startswith("gptjax") else "an index (its iterator: a dict)"
    print(f"| {name} | {1e3 * median:.2f} | {args.batch * args.block / median:,.0f} | {startup[name]:.2f} | {kept} |")
  if not has_grain:
    print("\n(grain is not installed: pip install grain to compare)")


if __name__ == "__main__":
  main()
