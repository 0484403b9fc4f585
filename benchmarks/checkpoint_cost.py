"""What verified checkpoints cost: the checksums of a checkpoint's arrays against the save and the
restore they ride on, for a model's parameters and AdamW state.

    python benchmarks/checkpoint_cost.py                     # GPT-2 124M, 3 rounds
    python benchmarks/checkpoint_cost.py --config shakespeare_char --rounds 5

One process, one device; each figure is the median of `--rounds`. Prints a markdown table.
"""

import argparse
import statistics
import tempfile
import time

import jax

from gptjax import checkpoint
from gptjax import checksum
from gptjax import config as config_lib
from gptjax import optim
from gptjax import sharding
from gptjax import steps as steps_lib


def _seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="gpt2_124m")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  cfg = config_lib.load_config(args.config)
  tx = optim.make_optimizer(cfg.optim, cfg.model)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  _, shardings = steps_lib.state_shardings(cfg.model, tx, mesh)
  state = steps_lib.init_state(cfg.model, tx, shardings, seed=0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          (state.params, state.opt_state))
  checksum.checksums((state.params, state.opt_state))  # compiles once, as a run does at its first save
  nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

  times = {"checksums": [], "save (async, then waited for)": [], "restore and verify": []}
  for round_ in range(args.rounds):
    times["checksums"].append(_seconds(lambda: checksum.checksums((state.params, state.opt_state))))
    with tempfile.TemporaryDirectory() as out_dir:
      manager = checkpoint.open_manager(out_dir)

      def save():
        checkpoint.save(manager, 1, params=state.params, opt_state=state.opt_state, progress={"step": 1},
                        config=cfg, tokenizer={"kind": "gpt2"}, val_loss=1.0)
        manager.wait_until_finished()

      times["save (async, then waited for)"].append(_seconds(save))
      times["restore and verify"].append(_seconds(lambda: checkpoint.restore_train_state(manager, 1, *abstract)))
      manager.close()

  print(f"{args.config}: {nbytes / 2**20:,.0f} MiB of parameters and AdamW state, {jax.devices()[0].device_kind}, "
        f"median of {args.rounds}\n")
  print("| what | seconds |\n|---|---|")
  for what, values in times.items():
    print(f"| {what} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
  main()
