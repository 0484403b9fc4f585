"""What `data.align=document` costs in coverage: the share of a split's tokens that one shuffled
epoch's windows hold, with windows starting every `block_size` tokens (`data.align=none`) or each
moved forward to the first document start in its block (`document`), and how many windows start
a document. On a prepared folder's documents and on made-up corpora of documents with
exponentially distributed lengths.

    python benchmarks/align_coverage.py --data out/recipe/bpe     # a prepared folder, and made-up corpora
    python benchmarks/align_coverage.py --tiny                    # that it runs

The windows come from `gptjax.data.TokenBatches` itself (one batch of a whole epoch), over a copy
of the documents' layout in which each token is its own position (+1) and each document start the
start token, so every window says where it begins.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gptjax import data  # noqa: E402

START = 0  # the start token in the layout; every other token is its position + 1


def _layout(starts: np.ndarray, n: int) -> np.ndarray:
  tokens = np.arange(1, n + 1, dtype=np.int64)
  tokens[starts] = START
  return tokens


def coverage(starts: np.ndarray, n: int, block: int, align: bool) -> tuple[float, float]:
  """(share of the n tokens that an epoch's windows hold as inputs, share of windows opening a
  document) for documents starting at `starts`."""
  tokens = _layout(starts, n)
  epoch = (n - 1) // block
  batches = data.TokenBatches(tokens, batch_size=epoch, block_size=block, order="shuffled",
                              align_to=START if align else None)
  inputs, targets = batches.batch(0)
  first, second = inputs[0, :, 0].astype(np.int64), targets[0, :, 0].astype(np.int64)
  window_starts = np.where(first == START, second - 2, first - 1)  # a start's next token is its position + 2
  held = np.zeros(n + 1, np.int64)
  np.add.at(held, window_starts, 1)
  np.add.at(held, window_starts + block, -1)
  return float((np.cumsum(held)[:n] > 0).mean()), float((first == START).mean())


def _made_up(n: int, mean_length: float, rng) -> np.ndarray:
  lengths = np.maximum(2, rng.exponential(mean_length, size=int(3 * n / mean_length) + 10).astype(np.int64))
  starts = np.concatenate([[0], np.cumsum(lengths)])
  return starts[starts < n - 1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=None, help="a prepared folder whose documents to lay out (its train split)")
  parser.add_argument("--start-id", type=int, default=50256, help="the folder's document start token")
  parser.add_argument("--tokens", type=int, default=4_000_000, help="the made-up corpora's size")
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args()
  n, lengths, blocks = (20_000, [64, 512], [64]) if args.tiny else (args.tokens, [64, 256, 1024, 4096], [64, 1024])
  rng = np.random.default_rng(0)
  corpora = []
  if args.data:
    tokens = data.load_tokens(args.data, "train")
    starts = np.flatnonzero(tokens == args.start_id)
    corpora.append((f"{args.data} ({len(starts)} documents)", starts, len(tokens), len(tokens) / max(len(starts), 1)))
  corpora += [(f"made up, mean length {m}", s, n, n / len(s)) for m in lengths if len(s := _made_up(n, m, rng))]
  print("| corpus | mean document (tokens) | block | held, align=none | held, align=document | windows opening a document |")
  print("|---|---|---|---|---|---|")
  for name, starts, size, mean in corpora:
    for block in blocks:
      plain, _ = coverage(starts, size, block, align=False)
      aligned, opening = coverage(starts, size, block, align=True)
      print(f"| {name} | {mean:,.0f} | {block} | {100 * plain:.1f}% | {100 * aligned:.1f}% | {100 * opening:.1f}% |")


if __name__ == "__main__":
  main()
