"""`gptjax explain`: one forward pass on a prompt, printed as a table of every stage with its shape
and what it does, from the token ids to the next token's five likeliest values.

    gptjax explain --checkpoint out/shakespeare_char_cpu --prompt "ROMEO:" --layers 0
    gptjax explain --config gpt2_124m --prompt "Hello, world"      # shapes only: no weights are made
    gptjax explain --config llama3_2_1b --layers 0,15

The shapes are what the model's own code computes: its `sow` calls, recorded by `nnx.capture`
(`model.forward_with_intermediates`), traced with `jax.eval_shape`, so that no stage's output is
kept in memory. With --config no parameters are made either, and there is no prediction to show.
"""

import argparse
import dataclasses
import functools
import re

import jax
import numpy as np

from gptjax import checkpoint
from gptjax import config as config_lib
from gptjax import data
from gptjax import model as model_lib
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

LEGEND = ("B batch, T positions (queries; keys too in T×T), D model width, H query heads, G key/value heads, "
          "K head size, F MLP hidden size (an expert's, in a mixture), E experts, k experts per token, V vocabulary")

# (stage, its axes, what it is); a stage the model did not compute (another architecture's) is left out.
BEFORE_BLOCKS = [
    ("token_embeddings", "B T D", "wte: the row of the [{V}, {D}] token table for each id"),
    ("position_embeddings", "T D", "{position_table}"),
    ("embeddings", "B T D", "token + position embeddings: the residual stream x"),
]
BLOCK = [
    ("ln_1", "B T D", "{norm} of x, before attention (pre-norm)"),
    ("attn/queries", "B T H K", "queries q = {attn_in} W_q, split into {H} heads of {K}"),
    ("attn/keys", "B T G K", "keys k = {attn_in} W_k, {G} heads{shared}"),
    ("attn/values", "B T G K", "values v = {attn_in} W_v, {G} heads"),
    ("attn/queries_normed", "B T H K", "RMSNorm over each query head's {K} values (qk_norm)"),
    ("attn/keys_normed", "B T G K", "RMSNorm over each key head's {K} values"),
    ("attn/queries_rotated", "B T H K", "rotary positions: each pair of q's values turned by position x a frequency"),
    ("attn/keys_rotated", "B T G K", "the same turn of k, so that q.k depends on how far apart two positions are"),
    ("attn/scores", "B H T T", "scores {scores}: each query position (row) against each key (column)"),
    ("attn/masked", "B H T T", "causal mask, before the softmax: -inf above the diagonal (keys after the query)"),
    ("attn/weights", "B H T T", "softmax over the keys: each row sums to 1 and is 0 above the diagonal"),
    ("attn/weighted_values", "B T H K", "weights @ v: each position's mix of the values at and before it"),
    ("attn/heads_concatenated", "B T H·K", "the {H} heads side by side"),
    ("attn/output", "B T D", "output projection c_proj: [{HK}] -> [{D}]"),
    ("attention_residual", "B T D", "residual add: x + attention"),
    ("ln_2", "B T D", "{norm} of x, before the MLP"),
    ("mlp/router_probs", "B T E", "router: softmax of ln_2(x) W_router over the {E} experts"),
    ("mlp/chosen_experts", "B T k", "the {k} likeliest experts' ids per position; their probabilities{renormalised} weight them"),
    ("mlp/experts", "B T D", "the chosen experts' MLPs ([{D}] -> {activation} of [{F}] -> [{D}]), weighted and summed: "
                            "grouped matmuls over the positions sorted by expert"),
    ("mlp/shared/down", "B T D", "the shared expert, every position's: [{D}] -> [{shared_hidden}] -> [{D}], added"),
    ("mlp/up", "B T F", "expansion c_fc: [{D}] -> [{F}]"),
    ("mlp/gate_and_up", "B T 2 F", "expansion c_fc: gate and up projections, [{D}] -> 2 x [{F}]"),
    ("mlp/activation", "B T F", "{activation}"),
    ("mlp/down", "B T D", "contraction c_proj: [{F}] -> [{D}]"),
    ("mlp_residual", "B T D", "residual add: x + MLP; the block's output"),
]
# Post-norm (model.norm_position=post): each norm after its residual add, and the sublayers read x itself.
POST_NORM = {"ln_1": ("ln_1", "B T D", "{norm} of x + attention (post-norm): the residual stream x from here"),
             "mlp_residual": ("mlp_residual", "B T D", "residual add: x + MLP"),
             "ln_2": ("ln_2", "B T D", "{norm} of x + MLP (post-norm): the block's output")}
POST_NORM_ORDER = ["attn/", "attention_residual", "ln_1", "mlp/", "mlp_residual", "ln_2"]
AFTER_BLOCKS = [
    ("ln_f", "B T D", "final {norm}"),
    ("logits", "B T V", "LM head, {head}: a score per vocabulary entry; the last row predicts the next token"),
]


def facts(cfg: config_lib.ModelConfig) -> dict:
  """The sizes and names the meanings above are written with."""
  rms, group = cfg.norm == "rmsnorm", cfg.n_head // cfg.kv_heads
  return dict(
      V=cfg.padded_vocab, D=cfg.n_embd, block=cfg.position_limit, H=cfg.n_head, G=cfg.kv_heads, K=cfg.head_size,
      HK=cfg.n_head * cfg.head_size, F=cfg.expert_size if cfg.n_experts else cfg.mlp_size, E=cfg.n_experts,
      k=cfg.experts_per_token, shared_hidden=cfg.shared_expert_hidden,
      renormalised=" (renormalised to sum to 1)" if cfg.moe_norm_topk else "",
      shared=f" (grouped-query: each serves {group} query heads)" if group > 1 else "",
      norm="RMSNorm (each position / its root mean square, x scale)" if rms else
      "LayerNorm (each position to mean 0, variance 1, x scale + bias)",
      activation="silu(gate) x up (SwiGLU)" if cfg.mlp == "swiglu" else "GELU (tanh approximation)",
      head="x wte^T (tied to the token table)" if cfg.tie_embeddings else "x lm_head",
      attn_in="x" if cfg.norm_position == "post" else "ln_1(x)",
      scores=f"q.k / sqrt({cfg.head_size})" if cfg.attention_scale == "sqrt" else
      "q.k, unscaled (model.attention_scale=none: they grow with the head size)",
      position_table=f"wpe: the row of the [{cfg.position_limit}, {cfg.n_embd}] position table for each position"
      if cfg.positions == "learned" else
      f"the sinusoidal table: sin, cos(pos / 10000^(2i/{cfg.n_embd})) in alternate dimensions; fixed, not learned")


def block_table(cfg: config_lib.ModelConfig) -> list[tuple]:
  """A block's stages in the order the configured block computes them."""
  if cfg.norm_position == "pre":
    return BLOCK
  rows = [POST_NORM.get(row[0], row) for row in BLOCK]
  return sorted(rows, key=lambda row: next(n for n, start in enumerate(POST_NORM_ORDER) if row[0].startswith(start)))


def parse_layers(spec: str | None, n_layer: int) -> list[int]:
  """'0,3' or '0-2' (or a mix; default: every block) -> block indices."""
  if spec is None:
    return list(range(n_layer))
  if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec):
    raise UserError(f"--layers {spec!r} is not a list of blocks such as 0,3 or 0-2")
  chosen = []
  for part in spec.split(","):
    first, _, last = part.partition("-")
    if int(last or first) < int(first):
      raise UserError(f"--layers {spec!r}: {part} runs backwards; write {last}-{first}")
    chosen.extend(range(int(first), int(last or first) + 1))
  if not chosen or not all(0 <= i < n_layer for i in chosen):
    raise UserError(f"--layers {spec!r}: the model's blocks are 0-{n_layer - 1}")
  return sorted(set(chosen))


def _shape(axes: str, shape: tuple, cfg: config_lib.ModelConfig) -> str:
  names = axes.replace("G", "H" if cfg.kv_heads == cfg.n_head else "G").split()
  if len(names) != len(shape):
    raise AssertionError(f"axes {axes} do not fit the shape {shape}")
  return "[" + ", ".join(str(size) if name.isdigit() else f"{name}={size}" for name, size in zip(names, shape)) + "]"


def stage_rows(cfg: config_lib.ModelConfig, intermediates: dict, tokens_BT, layers: list[int]) -> list[tuple]:
  """(stage, shape, meaning) for every stage the model computed, the blocks in `layers`."""
  described = facts(cfg)

  def rows(table, kept, indent="", described=described):
    out = []
    for path, axes, meaning in table:
      value = kept
      for key in path.split("/"):
        value = value.get(key) if isinstance(value, dict) else None
      if value is not None:
        out.append((indent + path.split("/")[-1], _shape(axes, value.shape, cfg), meaning.format(**described)))
    return out

  table = [("tokens", _shape("B T", tokens_BT.shape, cfg), "the prompt's token ids")]
  table += rows(BEFORE_BLOCKS, intermediates)
  if cfg.positions == "rope":
    table.append(("positions", "", "no position table: rotary positions turn queries and keys in each block"))
  if cfg.positions == "none":
    table.append(("positions", "", "none: causal attention alone, which sees which tokens came before, not their order"))
  blocks = intermediates["blocks"]
  for i in range(cfg.n_layer):
    if i in layers:
      dense = i in cfg.dense_layers
      table.append((f"block {i}", "", "a dense MLP among the experts (model.dense_layers)" if dense else ""))
      table += rows(block_table(cfg), blocks[i], "  ", described | {"F": cfg.mlp_size} if dense else described)
    elif i == 0 or i - 1 in layers:
      hidden = [j for j in range(i, cfg.n_layer) if j not in layers]
      hidden = hidden[:next((n for n, j in enumerate(hidden) if j != i + n), len(hidden))]  # the run from i
      table.append((f"blocks {i}-{hidden[-1]}" if len(hidden) > 1 else f"block {i}", "", "the same stages (--layers)"))
  if not cfg.has_final_norm:
    table.append(("ln_f", "", "no final norm (model.final_norm): the last block's output goes to the head"))
  return table + rows(AFTER_BLOCKS, intermediates)


def format_table(rows: list[tuple]) -> str:
  widths = [max(len(row[column]) for row in rows) for column in range(2)]
  return "\n".join(f"{stage:<{widths[0]}}  {shape:<{widths[1]}}  {meaning}".rstrip() for stage, shape, meaning in rows)


def token_label(tok, token_id: int) -> str:
  """A token as text one can read on a line: newlines and tabs escaped, spaces as '␣'."""
  return tok.decode([int(token_id)]).encode("unicode_escape").decode("ascii", "backslashreplace").replace(" ", "␣")


def top_tokens(logits_V, tok, k: int = 5) -> str:
  probs = np.asarray(jax.nn.softmax(np.asarray(logits_V, np.float32)))
  best = np.argsort(-probs)[:k]
  return ", ".join(f"'{token_label(tok, i)}' {probs[i]:.3f}" for i in best)


def _model_and_tokenizer(args) -> tuple[config_lib.ModelConfig, object, dict | None, str]:
  """(model config, tokenizer, parameters or None for --config, a line on where they came from)."""
  if args.checkpoint:
    cfg, tokenizer_meta, params, step = checkpoint.load_for_inference(args.checkpoint, args.step)
    return cfg.model, tokenizer_lib.from_meta(tokenizer_meta), params, f"{args.checkpoint}, step {step}"
  cfg = config_lib.load_config(args.config, args.overrides)
  try:
    meta = data.load_meta(cfg.data.dir)
  except UserError:  # no prepared data: GPT-2's BPE, whose ids fit the config's vocabulary
    if cfg.model.vocab_size < tokenizer_lib.GPT2_EOT_ID + 1:
      raise UserError(f"no prepared data in {cfg.data.dir} to take the tokenizer from: run `gptjax prepare` first")
    return cfg.model, tokenizer_lib.GPT2Tokenizer(), None, f"config {args.config}, untrained, GPT-2 tokens"
  model = dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"])
  return model, tokenizer_lib.from_meta(meta["tokenizer"]), None, f"config {args.config}, untrained"


def prompt_tokens(tok, text: str, block_size: int) -> np.ndarray:
  """[1, T] token ids of `text`; it must fit the context."""
  ids = tokenizer_lib.encode_sequence(tok, text)
  if not ids:
    raise UserError("the prompt is empty: give --prompt text")
  if len(ids) > block_size:
    raise UserError(f"the prompt is {len(ids)} tokens, more than the model's context of {block_size}")
  return np.asarray(ids, np.int32)[None]


def stage_shapes(cfg: config_lib.ModelConfig, tokens_BT: np.ndarray) -> dict:
  """What every stage computes on the prompt, as shapes: `jax.eval_shape` of the forward pass under
  `nnx.capture`, which allocates nothing (a long prompt's [T, T] weights of every block included)."""
  shapes, _ = model_lib.abstract_params(cfg)
  return jax.eval_shape(functools.partial(model_lib.forward_with_intermediates, cfg), shapes, tokens_BT)[1]


@functools.partial(jax.jit, static_argnames="cfg")
def next_token_logits(cfg: config_lib.ModelConfig, params: dict, tokens_BT: jax.Array) -> jax.Array:
  """[B, vocab]: the logits of the position after the prompt's last."""
  return model_lib.bind(cfg, params)(tokens_BT)[:, -1]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax explain", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="a run's out_dir: its weights, and the next token's prediction")
  source.add_argument("--config", help="a named config or YAML file: shapes only, nothing is allocated")
  parser.add_argument("--step", default="best", help="best (lowest val loss), latest, or a step number")
  parser.add_argument("--prompt", default="Hello", help="the text to run through the model")
  parser.add_argument("--layers", default=None, help="the blocks to show, e.g. 0 or 0,11 or 0-2 (default: all)")
  parser.add_argument("overrides", nargs="*", help="with --config: section.field=value, e.g. model.n_layer=4")
  args = parser.parse_intermixed_args(argv)
  if args.checkpoint and args.overrides:
    raise UserError("overrides apply to --config; a checkpoint's config is its own")

  cfg, tok, params, source_line = _model_and_tokenizer(args)
  layers = parse_layers(args.layers, cfg.n_layer)
  tokens_BT = prompt_tokens(tok, args.prompt, cfg.block_size)
  intermediates = stage_shapes(cfg, tokens_BT)
  print(f"{source_line}: {cfg.n_layer} blocks, D={cfg.n_embd}, H={cfg.n_head}, G={cfg.kv_heads}, K={cfg.head_size}, "
        f"F={facts(cfg)['F']}, "
        f"{f'E={cfg.n_experts} (k={cfg.experts_per_token}), ' if cfg.n_experts else ''}V={cfg.padded_vocab}; "
        f"prompt {args.prompt!r} is {tokens_BT.shape[1]} tokens")
  print(format_table([("stage", "shape", "what it is"), *stage_rows(cfg, intermediates, tokens_BT, layers)]))
  print(LEGEND)
  if params is not None:
    logits_V = next_token_logits(cfg, params, tokens_BT)[0, :cfg.vocab_size]
    print(f"next token after '{token_label(tok, tokens_BT[0, -1])}': {top_tokens(logits_V, tok)}")
