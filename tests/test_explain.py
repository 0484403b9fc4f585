"""`gptjax explain`: the shape trace lists every stage of the model's own forward pass, with the
shapes it computed, for GPT-2 and for the Llama / Qwen family (grouped-query attention, rotary
positions, SwiGLU, qk-norm)."""

import dataclasses

import jax
import numpy as np
import pytest

from gptjax import explain
from gptjax import model as model_lib
from gptjax.config import ModelConfig
from gptjax.errors import UserError

GPT2 = ModelConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=32)
LLAMA = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, positions="rope",
                    norm="rmsnorm", mlp="swiglu", mlp_hidden=48, bias=False, tie_embeddings=False, qk_norm=True)


def block_rows(T, D, H, G, K, F, swiglu=False, qk_norm=False, rope=False):
  """What a block's rows must say: (stage, shape)."""
  g = "G" if G != H else "H"
  rows = [("  ln_1", f"[B=1, T={T}, D={D}]"), ("  queries", f"[B=1, T={T}, H={H}, K={K}]"),
          ("  keys", f"[B=1, T={T}, {g}={G}, K={K}]"), ("  values", f"[B=1, T={T}, {g}={G}, K={K}]")]
  if qk_norm:
    rows += [("  queries_normed", f"[B=1, T={T}, H={H}, K={K}]"), ("  keys_normed", f"[B=1, T={T}, {g}={G}, K={K}]")]
  if rope:
    rows += [("  queries_rotated", f"[B=1, T={T}, H={H}, K={K}]"), ("  keys_rotated", f"[B=1, T={T}, {g}={G}, K={K}]")]
  rows += [(f"  {name}", f"[B=1, H={H}, T={T}, T={T}]") for name in ("scores", "masked", "weights")]
  rows += [("  weighted_values", f"[B=1, T={T}, H={H}, K={K}]"), ("  heads_concatenated", f"[B=1, T={T}, H·K={H * K}]"),
           ("  output", f"[B=1, T={T}, D={D}]"), ("  attention_residual", f"[B=1, T={T}, D={D}]"),
           ("  ln_2", f"[B=1, T={T}, D={D}]")]
  rows += [("  gate_and_up", f"[B=1, T={T}, 2, F={F}]")] if swiglu else [("  up", f"[B=1, T={T}, F={F}]")]
  return rows + [("  activation", f"[B=1, T={T}, F={F}]"), ("  down", f"[B=1, T={T}, D={D}]"),
                 ("  mlp_residual", f"[B=1, T={T}, D={D}]")]


def trace(cfg, layers, T=5):
  tokens = np.arange(T, dtype=np.int32)[None]
  return explain.stage_rows(cfg, explain.stage_shapes(cfg, tokens), tokens, layers)


def test_the_gpt2_trace_lists_every_stage_with_its_shape():
  rows = trace(GPT2, [1])
  assert [row[:2] for row in rows] == [
      ("tokens", "[B=1, T=5]"), ("token_embeddings", "[B=1, T=5, D=32]"), ("position_embeddings", "[T=5, D=32]"),
      ("embeddings", "[B=1, T=5, D=32]"), ("block 0", ""), ("block 1", ""),
      *block_rows(T=5, D=32, H=2, G=2, K=16, F=128), ("block 2", ""),
      ("ln_f", "[B=1, T=5, D=32]"), ("logits", "[B=1, T=5, V=65]")]
  assert rows[4][2] == "the same stages (--layers)" and "scores q.k / sqrt(16)" in dict((r[0], r[2]) for r in rows)["  scores"]


def test_the_llama_trace_shows_grouped_query_heads_rotary_positions_and_swiglu():
  rows = trace(LLAMA, [0, 1], T=7)
  assert [row[:2] for row in rows] == [
      ("tokens", "[B=1, T=7]"), ("token_embeddings", "[B=1, T=7, D=32]"), ("positions", ""),
      ("block 0", ""), *block_rows(T=7, D=32, H=4, G=2, K=8, F=48, swiglu=True, qk_norm=True, rope=True),
      ("block 1", ""), *block_rows(T=7, D=32, H=4, G=2, K=8, F=48, swiglu=True, qk_norm=True, rope=True),
      ("ln_f", "[B=1, T=7, D=32]"), ("logits", "[B=1, T=7, V=100]")]
  meanings = {stage: meaning for stage, _, meaning in rows}
  assert "each serves 2 query heads" in meanings["  keys"] and "SwiGLU" in meanings["  activation"]
  assert "lm_head" in meanings["logits"] and "RMSNorm" in meanings["ln_f"]


def test_a_mixture_with_a_dense_layer_shows_each_blocks_own_mlp():
  cfg = dataclasses.replace(LLAMA, n_experts=4, experts_per_token=2, expert_hidden=16, dense_layers=(0,))
  rows = trace(cfg, [0, 1])
  dense_block, sparse_block = rows.index(("block 0", "", "a dense MLP among the experts (model.dense_layers)")), \
      rows.index(("block 1", "", ""))
  dense, sparse = dict((r[0], r[1:]) for r in rows[dense_block:sparse_block]), dict((r[0], r[1:]) for r in rows[sparse_block:])
  assert dense["  gate_and_up"] == ("[B=1, T=5, 2, F=48]", "expansion c_fc: gate and up projections, [32] -> 2 x [48]")
  assert sparse["  router_probs"][0] == "[B=1, T=5, E=4]" and "[16]" in sparse["  experts"][1]
  assert "  router_probs" not in dense


def test_the_textbook_variants_show_their_stages_in_the_order_they_run():
  post = ModelConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, norm_position="post",
                     positions="sinusoidal", attention_scale="none")
  rows = trace(post, [0])
  stages = [row[0].strip() for row in rows]
  block = stages[stages.index("block 0") + 1:stages.index("ln_f")]
  assert block.index("attention_residual") < block.index("ln_1") < block.index("up") < block.index("mlp_residual") \
      < block.index("ln_2") == len(block) - 1  # each norm after its add
  meanings = {stage: meaning for stage, _, meaning in rows}
  assert dict((r[0], r[1]) for r in rows)["position_embeddings"] == "[T=5, D=32]"
  assert "sinusoidal" in meanings["position_embeddings"] and "queries q = x W_q" in meanings["  queries"]
  assert "unscaled" in meanings["  scores"] and "no final norm" in meanings["ln_f"]
  none = trace(ModelConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, positions="none"), [0])
  assert [row[0] for row in none[:3]] == ["tokens", "token_embeddings", "positions"]
  assert "position_embeddings" not in [row[0] for row in none]


def test_capturing_intermediates_leaves_the_logits_as_they_are():
  params = model_lib.init_params(LLAMA, jax.random.key(1))
  tokens = np.arange(6, dtype=np.int32)[None] % 100
  logits, intermediates = model_lib.forward_with_intermediates(LLAMA, params, tokens)
  np.testing.assert_allclose(logits, model_lib.bind(LLAMA, params)(tokens), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(intermediates["logits"], logits)
  last = intermediates["blocks"][-1]["mlp_residual"]  # the last block's output, normed, is ln_f
  np.testing.assert_allclose(model_lib.bind(LLAMA, params).ln_f(last), intermediates["ln_f"], rtol=1e-5, atol=1e-6)


def test_layers_are_chosen_by_list_and_range():
  assert explain.parse_layers(None, 4) == [0, 1, 2, 3]
  assert explain.parse_layers("3,0-1", 4) == [0, 1, 3]
  for bad in ("4", "a", "1-", "", "2-1"):
    with pytest.raises(UserError):
      explain.parse_layers(bad, 4)


def test_explain_a_checkpoint_prints_the_table_and_the_next_token(tiny_run, capsys):
  run, _ = tiny_run
  explain.main(["--checkpoint", str(run), "--prompt", "ROMEO:", "--layers", "1"])
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith(f"{run}, step 30: 2 blocks") and out[1].split() == ["stage", "shape", "what", "it", "is"]
  assert out[2].startswith("tokens") and "[B=1, T=6]" in out[2]
  assert any(line.startswith("  weights ") and "[B=1, H=2, T=6, T=6]" in line for line in out)
  nexts = out[-1].removeprefix("next token after ':': ").split(", ")
  assert len(nexts) == 5 and 0 < sum(float(n.rsplit(" ", 1)[1]) for n in nexts) <= 1.0001
