"""Perplexity of a checkpoint on a text file or a prepared split, with sliding windows.

    gptjax perplexity --checkpoint out/shakespeare_char_cpu --split val
    gptjax perplexity --checkpoint out/gpt2 --text milton.txt --stride 512
    gptjax perplexity --checkpoint out/big --split val mesh.fsdp=8     # parameters split over 8 devices

The standard method for fixed-context models (as in Hugging Face's perplexity guide): windows of up
to `block_size` tokens start every `stride` tokens; each window scores only the tokens that earlier
windows did not, each with at least `block_size - stride` tokens of context where the text has them.
With stride < block_size every token after the first is scored once; stride = block_size gives
disjoint windows, whose first tokens have no context and are not scored. A `--text` is read as a
document (`document_tokens`): after end-of-text (GPT-2) or its beginning-of-sequence token (Llama),
so its first token is scored too; a character model's first character is not.

Parameters are placed on a device mesh by the same rules as in training (`mesh.*` overrides; by
default data parallel over this machine's devices, the windows of a batch split between them).
"""

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gptjax import checkpoint
from gptjax import data
from gptjax import model as model_lib
from gptjax import sources
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax.config import ModelConfig
from gptjax.errors import UserError


BATCH_TOKENS = 16_384  # the default batch of windows: 256 of the demo's 64 tokens, 8 of 2048 (few dispatches)


def document_tokens(tok, text: str) -> np.ndarray:
  """A text's tokens as the model reads a document: after its beginning-of-sequence token (Llama)
  or, without one, after end-of-text (GPT-2: training saw each document after the one before it
  ended), so that its first token is scored too; a character model's text as it is."""
  prefix = [tok.eot_id] if tok.bos_id is None and tok.eot_id is not None else []
  return np.asarray(prefix + tokenizer_lib.encode_sequence(tok, text), np.int32)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first_scored) per window: it reads tokens[begin:end] and scores positions
  [first_scored, end), each predicted from the tokens before it inside the window."""
  windows, scored_until = [], 0
  for begin in range(0, n_tokens - 1, stride):
    end = min(begin + context, n_tokens)
    windows.append((begin, end, max(scored_until, begin + 1)))  # a window's first token has no context
    scored_until = end
    if end == n_tokens:
      break
  return windows


@functools.partial(jax.jit, static_argnames="cfg")
def _window_nll(params, inputs, targets, weights, *, cfg: ModelConfig):
  """inputs, targets, weights: [W, block] -> summed weighted NLL over the windows."""
  return jnp.sum(model_lib.bind(cfg, params).nll(inputs, targets) * weights)


def perplexity(cfg: ModelConfig, params, tokens: np.ndarray, *, stride: int, batch_size: int = 8,
               mesh: jax.sharding.Mesh | None = None, progress: bool = False) -> dict:
  """{"tokens": scored token count, "nll": mean NLL in nats, "perplexity": exp(nll)}.

  With a `mesh` (that `params` are placed on), each batch of windows is split over its batch
  axes; `batch_size` (at most the number of windows) is rounded up to a multiple of them (the
  extra windows weigh nothing).
  `progress`: a bar of the windows done, on a terminal.
  """
  block = cfg.block_size
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} is not positive")
  if not 0 < stride <= block:
    raise UserError(f"stride={stride} is not in [1, block_size={block}]")
  if len(tokens) < 2:
    raise UserError(f"the text has {len(tokens)} tokens; perplexity needs at least 2")
  tokens = np.asarray(tokens, np.int32)
  windows = sliding_windows(len(tokens), block, stride)
  shards = sharding.batch_shards(mesh)
  batch_size = -(-min(batch_size, len(windows)) // shards) * shards  # a short text: no rows of padding
  total_nll, total_count = 0.0, 0
  bar = tqdm(total=len(windows), unit="window", desc="perplexity", dynamic_ncols=True,
             disable=None if progress and jax.process_index() == 0 else True)  # None: only on a terminal
  for first in range(0, len(windows), batch_size):  # fixed [batch_size, block] shapes: one compile
    inputs = np.zeros((batch_size, block), np.int32)
    targets = np.zeros((batch_size, block), np.int32)
    weights = np.zeros((batch_size, block), np.float32)
    for row, (begin, end, scored_from) in enumerate(windows[first:first + batch_size]):
      inputs[row, :end - begin] = tokens[begin:end]
      targets[row, :end - begin - 1] = tokens[begin + 1:end]  # position j predicts token begin + j + 1
      weights[row, scored_from - begin - 1:end - begin - 1] = 1.0
    total_count += int(weights.sum())
    with sharding.on_mesh(mesh):
      total_nll += float(_window_nll(params, *sharding.put_rows((inputs, targets, weights), mesh), cfg=cfg))
    bar.update(len(windows[first:first + batch_size]))
  bar.close()
  nll = total_nll / total_count
  return {"tokens": total_count, "nll": nll, "perplexity": math.exp(nll)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax perplexity", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  checkpoint.add_inference_arguments(parser)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="a text file, folder or glob, tokenized with the model's tokenizer")
  source.add_argument("--split", choices=["train", "val"], help="a split of the run's prepared data")
  parser.add_argument("--data-dir", default=None, help="prepared data for --split (default: the run's data.dir)")
  parser.add_argument("--stride", type=int, default=None, help="window stride (default: block_size // 2)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help=f"windows per forward pass (default: about {BATCH_TOKENS:,} tokens' worth)")
  args = parser.parse_intermixed_args(argv)

  cfg, tok, params, step, mesh = checkpoint.load_model(args.checkpoint, args.step, args.mesh)
  if args.text is not None:
    tokens = document_tokens(tok, sources.read_text(args.text))
    what = args.text
  else:
    data_dir = args.data_dir or cfg.data.dir
    if data.load_meta(data_dir)["tokenizer"] != tok.to_meta():
      raise UserError(f"{data_dir} was prepared with another tokenizer than the checkpoint's")
    tokens = data.load_tokens(data_dir, args.split)
    what = f"{data_dir} {args.split}"
  stride = cfg.model.block_size // 2 if args.stride is None else args.stride
  batch_size = max(1, BATCH_TOKENS // cfg.model.block_size) if args.batch_size is None else args.batch_size
  result = perplexity(cfg.model, params, tokens, stride=stride, batch_size=batch_size, mesh=mesh, progress=True)
  print(f"{what} (checkpoint step {step}, context {cfg.model.block_size}, stride {stride}): "
        f"{result['tokens']:,} tokens, mean NLL {result['nll']:.4f} nats, perplexity {result['perplexity']:.3f}")
