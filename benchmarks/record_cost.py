"""What watching a run costs: the work `gptjax train` adds to a log step (a metrics.jsonl row and
its TensorBoard scalars) and to an evaluation (the sample, loss.png), against the train step itself.

    python benchmarks/record_cost.py                          # shakespeare_char_cpu, 2000 steps of history
    python benchmarks/record_cost.py --config shakespeare_char --rounds 5
    python benchmarks/record_cost.py --tiny                   # a 2-layer model: that the script runs

One process, one device, fresh parameters; each figure is the median of `--rounds`. Prints a
markdown table.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import optim
from gptjax import plots
from gptjax import record
from gptjax import sample
from gptjax import sharding
from gptjax import steps as steps_lib

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.batch_size=4"]


def _seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="shakespeare_char_cpu")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args()

  cfg = config_lib.load_config(args.config, TINY if args.tiny else [])
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=77))  # the built-in characters
  t, history = cfg.train, 200 if args.tiny else 2000
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  steps = steps_lib.compile_steps(cfg, tx, schedule, mesh)
  state = steps_lib.init_state(cfg.model, tx, steps.shardings, seed=0)
  tokens = np.zeros((1, t.batch_size, cfg.model.block_size), np.int32)
  batch = sharding.put_batch(tokens, mesh)
  state, _ = steps.train(state, batch, batch)  # compiled, warmed (the step donates its state: keep the new one)

  def train_step():
    nonlocal state
    state, step_metrics = steps.train(state, batch, batch)
    return step_metrics

  with tempfile.TemporaryDirectory() as out_dir:
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, out_dir=out_dir))
    run_record = record.Record(run_cfg, 0, resume=False)
    for step in range(10, history + 1, 10):  # a run's history: a row per log step, an evaluation per 500
      run_record.write("train", step, {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "skipped_steps": 0})
      if step % 500 == 0:
        run_record.write("eval", step, {"train_loss": 2.0, "val_loss": 2.1})
    row = {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "skipped_steps": 0}
    generate = lambda: sample.generate(cfg.model, state.params, np.zeros((1, 1), np.int32),  # noqa: E731
                                       max_new_tokens=t.sample_tokens, rng=jax.random.key(0), temperature=0.8)
    generate()  # compiled
    times = {"train step": [], "log step's record (jsonl row + TensorBoard scalars)": [],
             f"evaluation's sample ({t.sample_tokens} tokens)": [], f"evaluation's loss.png ({history // 10} log rows)": []}
    for _ in range(args.rounds):
      times["train step"].append(_seconds(train_step))
      times["log step's record (jsonl row + TensorBoard scalars)"].append(
          _seconds(lambda: run_record.write("train", history, row)))
      times[f"evaluation's sample ({t.sample_tokens} tokens)"].append(_seconds(generate))
      times[f"evaluation's loss.png ({history // 10} log rows)"].append(
          _seconds(lambda: plots.draw({"run": run_record.rows}, f"{out_dir}/loss.png", "loss")))
    run_record.close()

  step_s = statistics.median(times["train step"])
  print(f"{args.config}{' (tiny)' if args.tiny else ''} on {jax.devices()[0].platform}, median of {args.rounds}:\n")
  print("| work | ms | in train steps |")
  print("|---|---|---|")
  for what, seconds in times.items():
    median = statistics.median(seconds)
    print(f"| {what} | {1e3 * median:,.1f} | {median / step_s:.2f} |")


if __name__ == "__main__":
  main()
