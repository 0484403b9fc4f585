"""Train one config twice, with gptjax and with PyTorch + transformers' GPT2LMHeadModel, on the same
batches with the same optimizer settings, and print their losses side by side.

    python benchmarks/loss_parity.py optim.learning_rate=1e-3 optim.min_lr=1e-4   # nanoGPT's rate
    python benchmarks/loss_parity.py train.max_iters=200   # any config override

Needs `pip install torch==2.13.0 transformers` and prepared data (`gptjax prepare`). The reference
is the test of whether a loss figure is gptjax's doing or the recipe's.
"""

import math
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

from gptjax import config as config_lib
from gptjax import data
from gptjax import train


def torch_reference(cfg: config_lib.Config, vocab_size: int) -> dict:
  m, o, t = cfg.model, cfg.optim, cfg.train
  torch.manual_seed(t.seed)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
      n_head=m.n_head, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=0.0,
      layer_norm_epsilon=m.layer_norm_epsilon))
  decay = [p for p in model.parameters() if p.dim() >= 2]  # HF's Conv1D biases are rank 1
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=1e-8)

  def lr_at(step):  # optax.warmup_cosine_decay_schedule
    if step < o.warmup_iters:
      return o.learning_rate * step / o.warmup_iters
    progress = min(1.0, (step - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters))
    return o.min_lr + 0.5 * (o.learning_rate - o.min_lr) * (1 + math.cos(math.pi * progress))

  def loss_of(inputs, targets):
    logits = model(torch.from_numpy(inputs)).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).long().flatten())

  batch_args = dict(batch_size=t.batch_size, block_size=m.block_size)
  splits = {s: data.load_tokens(cfg.data.dir, s) for s in ("train", "val")}
  batches = data.TokenBatches(splits["train"], seed=t.seed, **batch_args)
  for step in range(t.max_iters):
    inputs, targets = next(batches)
    for group in optimizer.param_groups:
      group["lr"] = lr_at(step)
    loss = loss_of(inputs[0], targets[0])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()

  model.eval()
  result = {}
  with torch.no_grad():
    for split, seed in (("train", t.seed + 1), ("val", t.seed + 2)):  # the batches gptjax evaluates on
      eval_batches = data.TokenBatches(splits[split], seed=seed, **batch_args)
      result[f"{split}_loss"] = float(np.mean([loss_of(*(a[0] for a in eval_batches.batch(i))).item()
                                                for i in range(t.eval_iters)]))
  return result


def main(overrides):
  cfg = config_lib.load_config("shakespeare_char_cpu", overrides)
  vocab_size = data.load_meta(cfg.data.dir)["vocab_size"]
  rows = []
  with tempfile.TemporaryDirectory() as out_dir:
    cfg_jax = config_lib.load_config("shakespeare_char_cpu", [*overrides, f"train.out_dir={out_dir}"])
    start = time.perf_counter()
    ours, _ = train.train(cfg_jax, progress_bar=False)
    rows.append(("gptjax (JAX/Flax)", ours, time.perf_counter() - start))
  start = time.perf_counter()
  rows.append(("transformers GPT2LMHeadModel (PyTorch)", torch_reference(cfg, vocab_size), time.perf_counter() - start))

  print(f"\n{cfg.train.max_iters} steps of shakespeare_char_cpu {' '.join(overrides)}; losses: mean of "
        f"{cfg.train.eval_iters} batches")
  print("| implementation | train loss | val loss | wall time (s) |\n|---|---|---|---|")
  for name, result, seconds in rows:
    print(f"| {name} | {result['train_loss']:.4f} | {result['val_loss']:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
  main(sys.argv[1:])
