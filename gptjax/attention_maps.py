"""`gptjax attention`: where each head of a checkpoint looks, on a prompt. A PNG per block (a panel
per head: the softmax weights, query positions down, key positions across, token labels on both
axes) and the arrays themselves in attention.npz.

    gptjax attention --checkpoint out/shakespeare_char_cpu --prompt "ROMEO: But soft"
    gptjax attention --checkpoint out/gpt2 --prompt "The cat sat on the mat" --layers 0,11 --output maps/

The weights are those the model computes (`nnx.capture` of its `sow` calls: the same attention
code as generation's), not a copy of the attention math. attention.npz holds `weights` [layers,
heads, T, T] (float32), `layers`, `tokens` and `labels`.
"""

import argparse
import functools
import math
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from gptjax import checkpoint
from gptjax import explain
from gptjax import model as model_lib
from gptjax.errors import UserError

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100
MAX_LABELED = 48  # positions; longer prompts label every few


def grid(heads: int) -> tuple[int, int]:
  """(rows, columns) of panels for `heads` heads."""
  columns = min(heads, 4)
  return math.ceil(heads / columns), columns


def figure_inches(heads: int, positions: int) -> tuple[float, float]:
  """(width, height) of a layer's figure; at DPI dots per inch, the PNG's size."""
  panel = min(6.0, max(3.0, 1.5 + 0.12 * positions))
  rows, columns = grid(heads)
  return columns * panel, rows * (panel + 0.4) + 0.5  # room for labels under each panel, and the title


def plot_layer(weights_HTT: np.ndarray, labels: list[str], title: str, path: str) -> None:
  """One block's attention weights as a grid of heatmaps, a panel per head, saved as a PNG."""
  heads, positions = weights_HTT.shape[0], weights_HTT.shape[1]
  rows, columns = grid(heads)
  fig, axes = plt.subplots(rows, columns, figsize=figure_inches(heads, positions), dpi=DPI, squeeze=False,
                           layout="constrained")
  step = math.ceil(positions / MAX_LABELED)
  ticks = np.arange(0, positions, step)
  for h, ax in enumerate(axes.flat):
    if h >= heads:
      ax.axis("off")
      continue
    ax.imshow(weights_HTT[h], cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_title(f"head {h}", fontsize=9)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
  fig.suptitle(f"{title}\nrows: queries; columns: the keys they attend to; brighter: more weight (each panel "
               "to its own largest)", fontsize=10)
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def attention_weights(cfg, params, tokens_BT: np.ndarray, layers: list[int]) -> np.ndarray:
  """[len(layers), heads, T, T] float32: the softmax weights of the first prompt in each of `layers`."""
  return np.asarray(_weights(cfg, params, tokens_BT, tuple(layers)))


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _weights(cfg, params, tokens_BT, layers: tuple[int, ...]):
  """Only the blocks asked for leave the device: the other intermediates are never kept."""
  blocks = model_lib.forward_with_intermediates(cfg, params, tokens_BT)[1]["blocks"]
  return jnp.stack([blocks[i]["attn"]["weights"][0] for i in layers])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax attention", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  checkpoint.add_inference_arguments(parser, mesh=False)
  parser.add_argument("--prompt", required=True, help="the text whose attention to draw")
  parser.add_argument("--layers", default=None, help="the blocks to draw, e.g. 0 or 0,11 or 0-2 (default: all)")
  parser.add_argument("--output", default=None, help="the folder to write to (default: CHECKPOINT/attention)")
  args = parser.parse_args(argv)

  cfg, tok, params, step, _ = checkpoint.load_model(args.checkpoint, args.step)
  layers = explain.parse_layers(args.layers, cfg.model.n_layer)
  tokens_BT = explain.prompt_tokens(tok, args.prompt, cfg.model.block_size)
  weights = attention_weights(cfg.model, params, tokens_BT, layers)
  labels = [explain.token_label(tok, t) for t in tokens_BT[0]]
  output = args.output or os.path.join(args.checkpoint, "attention")
  variants = "".join(f", {v}" for v in cfg.model.textbook_variants())  # a post-norm or position-free model says so
  try:
    os.makedirs(output, exist_ok=True)
    np.savez(os.path.join(output, "attention.npz"), weights=weights, layers=np.asarray(layers),
             tokens=tokens_BT[0], labels=np.asarray(labels))
    for i, weights_HTT in zip(layers, weights):
      plot_layer(weights_HTT, labels, f"block {i} of {args.checkpoint} (step {step}{variants})",
                 os.path.join(output, f"layer_{i}.png"))
  except OSError as e:
    raise UserError(f"cannot write to {output}: {e.strerror}") from None
  print(f"attention of {len(labels)} tokens in blocks {', '.join(map(str, layers))}: {output}/layer_*.png, "
        f"{output}/attention.npz")
