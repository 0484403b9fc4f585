"""The named configs' sizes and memory per device, as training's start-up report gives them, from
shapes alone (nothing is allocated): parameters, optimizer state, XLA's gradients and activations
for the compiled train step, and the KV cache per sequence.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/model_sizes.py --mesh-fsdp 8
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/model_sizes.py --mesh-expert 8 \
        --configs moe_shakespeare_cpu qwen3_30b_a3b --shardings-only

Each config gets the vocabulary of its family's tokenizer. Compiling on CPU gives CPU's buffer
assignment, which is close to, not the same as, a GPU's; `--shardings-only` skips it (parameters
and optimizer state only, from their shardings). Prints a markdown table.
"""

import argparse
import dataclasses

import jax

from gptjax import config as config_lib
from gptjax import metrics
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax import steps as steps_lib

VOCABULARIES = {"shakespeare_char_cpu": 77, "llama_shakespeare_cpu": 77, "gpt2_124m": 50257, "smollm2_135m": 49152,
                "qwen3_0_6b": 151669, "llama3_2_1b": 128256, "moe_shakespeare_cpu": 77, "qwen3_30b_a3b": 151936}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="*", default=list(VOCABULARIES))
  parser.add_argument("--mesh-fsdp", type=int, default=1, help="devices the parameters are sharded over")
  parser.add_argument("--mesh-expert", type=int, default=1, help="devices a mixture's experts are split over")
  parser.add_argument("--shardings-only", action="store_true", help="no compiled step: parameters and optimizer state")
  parser.add_argument("--batch-size", type=int, default=0, help="per-step sequences (default: the config's)")
  args = parser.parse_args()

  data = jax.device_count() // (args.mesh_fsdp * args.mesh_expert)
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh fsdp={args.mesh_fsdp} expert={args.mesh_expert}\n")
  print("| config | parameters | batch x context | parameters / device | optimizer state / device | "
        "gradients and activations / device (XLA) | KV cache per sequence |")
  print("|---|---|---|---|---|---|---|")
  for name in args.configs:
    cfg = config_lib.load_config(name, [f"mesh.data={data}", f"mesh.fsdp={args.mesh_fsdp}", f"mesh.expert={args.mesh_expert}",
                                        *([f"train.batch_size={args.batch_size}"] if args.batch_size else [])])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=VOCABULARIES[name]))
    tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
    mesh = sharding.make_mesh(cfg.mesh)
    if args.shardings_only:
      abstract, shardings = steps_lib.state_shardings(cfg.model, tx, mesh)
      sizes = {"parameters": sharding.bytes_per_device(abstract.params, shardings.params),
               "optimizer state": sharding.bytes_per_device(abstract.opt_state, shardings.opt_state)}
    else:
      steps = steps_lib.compile_steps(cfg, tx, schedule, mesh)
      abstract, sizes = steps.abstract, metrics.memory_per_device(steps.abstract, steps.shardings, steps.train)
    sizes = {"gradients and activations": "-"} | {k: f"{v / 2**20:,.1f} MiB" for k, v in sizes.items()}
    print(f"| `{name}` | {model_lib.count_params(abstract.params) / 1e6:,.1f}M | "
          f"{cfg.train.batch_size} x {cfg.model.block_size} | {sizes['parameters']} | {sizes['optimizer state']} | "
          f"{sizes['gradients and activations']} | {metrics.kv_cache_bytes(cfg.model) / 2**20:,.1f} MiB |")

if __name__ == "__main__":
  main()
