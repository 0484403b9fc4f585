"""Where a train step's time goes: trains a few steps with `train.profile`, reads the trace back
and prints, per shape, the JAX operations that took the most time (forward or backward), as
milliseconds per step and shares of the traced compute time.

    python benchmarks/where_time_goes.py                  # the CPU shapes of benchmarks/vs_transformers.py
    python benchmarks/where_time_goes.py --tiny           # a tiny shape: checks that the script works

On CPU the times are summed over XLA's compute threads, so they add up to more than the wall
time of a step when operations run side by side. Prints markdown tables.
"""

import argparse
import contextlib
import io
import json
import pathlib
import subprocess
import sys
import tempfile

import jax

from gptjax import config as config_lib
from gptjax import train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from vs_transformers import TINY_TRAIN, TRAIN_SHAPES  # noqa: E402  the same shapes

PROFILED_STEPS = 4
TOP = 8


def where_time_goes(overrides: list[str], data_dir: str) -> list[tuple[str, float, float]]:
  """The table that `train.profile` writes beside its trace: [(operation, ms per step, share)]."""
  warmup = 3
  with tempfile.TemporaryDirectory() as out:
    cfg = config_lib.load_config("shakespeare_char_cpu", [
        *overrides, f"data.dir={data_dir}", f"train.out_dir={out}", f"train.max_iters={warmup + PROFILED_STEPS}",
        f"train.profile={warmup}:{warmup + PROFILED_STEPS}", "train.eval_interval=1000000",
        "train.checkpoint_interval=1000000", "train.eval_iters=1", "train.log_interval=1000000"])
    with contextlib.redirect_stdout(io.StringIO()):
      train.train(cfg, progress_bar=False)
    return json.loads(pathlib.Path(out, "profile", "summary.json").read_text())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="one tiny shape: checks that the script works")
  args = parser.parse_args()
  print(f"{jax.devices()[0].device_kind}, {PROFILED_STEPS} steps traced; the {TOP} largest of each shape\n")
  with tempfile.TemporaryDirectory() as tmp:
    for title, tokenizer, _, overrides in TINY_TRAIN if args.tiny else TRAIN_SHAPES:
      data_dir = pathlib.Path(tmp) / tokenizer
      if not data_dir.exists():
        subprocess.run([sys.executable, "-m", "gptjax.cli", "prepare", "--tokenizer", tokenizer, "--out", str(data_dir)],
                       check=True, capture_output=True)
      table = where_time_goes(overrides, str(data_dir))
      print(f"| {title} | ms per step | share |\n|---|---|---|")
      for name, ms, share in table[:TOP]:
        print(f"| {name} | {ms:.1f} | {share:.0%} |")
      rest = table[TOP:]
      print(f"| everything else ({len(rest)} kinds) | {sum(ms for _, ms, _ in rest):.1f} | "
            f"{sum(s for _, _, s in rest):.0%} |\n", flush=True)


if __name__ == "__main__":
  main()
