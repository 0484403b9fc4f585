"""The textbook variants of the one model: post-norm blocks, sinusoidal and no positions, and
attention without its 1/sqrt(head size), each against what the paper or a hand-written block says."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model as model_lib
from gptjax.config import ModelConfig
from gptjax.model import sinusoidal

ONE_BLOCK = ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16, scan_layers="false")


def _random_params(cfg, seed=0, scale=0.5):
  """Every parameter (scales and biases too) drawn at random, so no part of the block is an identity."""
  params = model_lib.init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _logits(cfg, params, tokens):
  return np.asarray(model_lib.bind(cfg, params)(jnp.asarray(tokens)))


def _layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _post_norm_by_hand(params, tokens):
  """The original Transformer's block, written out: x = LN(x + Attention(x)); x = LN(x + MLP(x));
  GPT-2's learned positions, tied head, no final norm."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = jax.tree.map(lambda a: a[0], p["h"])
  T = tokens.shape[1]
  x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][:T]
  qkv = np.einsum("btd,dnhk->btnhk", x, h["attn"]["c_attn"]["kernel"]) + h["attn"]["c_attn"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  scores = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = np.einsum("bhts,bshk->bthk", weights, v)
  x = _layer_norm(x + np.einsum("bthk,hkd->btd", attended, h["attn"]["c_proj"]["kernel"]) + h["attn"]["c_proj"]["bias"],
                  h["ln_1"])
  up = x @ h["mlp"]["c_fc"]["kernel"] + h["mlp"]["c_fc"]["bias"]
  gelu = 0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up ** 3)))
  x = _layer_norm(x + gelu @ h["mlp"]["c_proj"]["kernel"] + h["mlp"]["c_proj"]["bias"], h["ln_2"])
  return x @ p["wte"]["embedding"].T


def test_post_norm_equals_the_block_written_out_by_hand():
  cfg = dataclasses.replace(ONE_BLOCK, norm_position="post")
  params = _random_params(cfg)
  assert "ln_f" not in params  # a post-norm block's output is normalised already
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  np.testing.assert_allclose(_logits(cfg, params, tokens), _post_norm_by_hand(params, tokens), atol=1e-4, rtol=1e-4)
  with_final = dataclasses.replace(cfg, final_norm="true")
  assert "ln_f" in model_lib.init_params(with_final, jax.random.key(0))


def test_sinusoidal_positions_are_the_papers_formula_added_to_the_embeddings():
  T, D = 12, 16
  paper = np.zeros((T, D))
  for pos in range(T):
    for i in range(D // 2):
      paper[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / D))
      paper[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / D))
  np.testing.assert_allclose(sinusoidal.table(jnp.arange(T), D), paper, atol=1e-5)
  cfg = dataclasses.replace(ONE_BLOCK, positions="sinusoidal")
  params = model_lib.init_params(cfg, jax.random.key(0))
  assert "wpe" not in params  # nothing learned
  tokens = np.arange(T, dtype=np.int32)[None] % cfg.vocab_size
  _, kept = model_lib.forward_with_intermediates(cfg, params, tokens)
  np.testing.assert_allclose(kept["position_embeddings"], paper, atol=1e-5)
  np.testing.assert_allclose(kept["embeddings"][0], params["wte"]["embedding"][tokens[0]] + paper, atol=1e-5)


@pytest.mark.parametrize("positions", ["none", "learned", "sinusoidal", "rope"])
def test_without_positions_a_token_sees_only_the_set_of_tokens_before_it(positions):
  cfg = dataclasses.replace(ONE_BLOCK, positions=positions)
  params = _random_params(cfg)
  tokens = np.random.default_rng(1).permutation(cfg.vocab_size)[:8][None]  # distinct tokens
  permuted = tokens.copy()
  permuted[0, :7] = tokens[0, [3, 0, 6, 1, 5, 2, 4]]  # the 7 before the last, reordered
  last, last_permuted = _logits(cfg, params, tokens)[0, 7], _logits(cfg, params, permuted)[0, 7]
  if positions == "none":
    np.testing.assert_allclose(last, last_permuted, atol=1e-5)
  else:
    assert np.abs(last - last_permuted).max() > 1e-3


def _largest_weight_per_query(cfg, params, tokens):
  _, kept = model_lib.forward_with_intermediates(cfg, params, tokens)
  weights_BHTT = np.asarray(kept["blocks"][0]["attn"]["weights"])
  return weights_BHTT[..., 8:, :].max(-1).mean()  # queries with 9 or more keys to choose among


def test_without_the_scale_the_softmax_saturates():
  # Queries and keys whose entries are about N(0, 1): q.k grows like sqrt(K) = 16, q.k / sqrt(K) stays near N(0, 1).
  cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=1, n_embd=256, bias=False)
  params = model_lib.init_params(cfg, jax.random.key(0))
  c_attn = params["h"]["attn"]["c_attn"]
  c_attn["kernel"] = jax.random.normal(jax.random.key(1), c_attn["kernel"].shape) / math.sqrt(cfg.n_embd)
  tokens = np.arange(32, dtype=np.int32)[None]
  scaled = _largest_weight_per_query(cfg, params, tokens)
  unscaled = _largest_weight_per_query(dataclasses.replace(cfg, attention_scale="none"), params, tokens)
  assert unscaled > 0.9 > 0.5 > scaled  # nearly one-hot rows without the scale: their gradient all but vanishes


@pytest.mark.parametrize("variant", [dict(norm_position="post"), dict(positions="sinusoidal"), dict(positions="none"),
                                     dict(attention_scale="none"), dict(norm_position="post", final_norm="true")])
def test_each_variant_decodes_with_its_cache_as_the_full_forward_pass(variant):
  cfg = dataclasses.replace(ONE_BLOCK, n_layer=2, **variant)
  params = _random_params(cfg, scale=0.2)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  prefill = jax.jit(lambda params, prompt: model_lib.bind(cfg, params).prefill(prompt, 10))  # eager: slow
  decode = jax.jit(lambda params, token, cache: model_lib.bind(cfg, params).decode(token, cache))
  logits, cache = prefill(params, tokens[:, :4])
  decoded = [logits]
  for t in range(4, 9):
    logits, cache = decode(params, tokens[:, t:t + 1], cache)
    decoded.append(logits)
  full = jax.jit(lambda params: model_lib.bind(cfg, params)(tokens))(params)
  np.testing.assert_allclose(jnp.stack(decoded, axis=1), full[:, 3:9], atol=1e-4)
