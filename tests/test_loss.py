"""The chunked LM head and cross-entropy against the whole logits' optax cross-entropy: the same
loss and gradients, on GPT-2 and on a Llama whose vocabulary is padded."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax.model import loss

GPT2 = config_lib.load_config("shakespeare_char_cpu", ["model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                                                       "model.vocab_size=77"]).model
LLAMA = config_lib.load_config("llama_shakespeare_cpu", ["model.n_layer=2", "model.n_embd=32", "model.n_head=4",
                                                         "model.n_kv_head=2", "model.vocab_size=77",
                                                         "model.vocab_multiple=64", "model.tie_embeddings=false"]).model


def _whole_logits_loss(cfg, params, tokens, targets):
  return optax.softmax_cross_entropy_with_integer_labels(model_lib.bind(cfg, params)(tokens), targets).mean()


def _chunked_loss(cfg, params, tokens, targets):
  return model_lib.bind(cfg, params).nll(tokens, targets).mean()


@pytest.mark.parametrize("cfg, chunk", [(GPT2, 16), (LLAMA, 24)],  # 4 chunks of 16; 3 of 22 (2 positions padded)
                         ids=["gpt2", "llama, vocabulary padded 77 -> 128"])
def test_chunked_loss_and_gradients_equal_the_whole_logits_cross_entropy(cfg, chunk):
  assert cfg.padded_vocab == (128 if cfg is LLAMA else 77)
  chunked_cfg = dataclasses.replace(cfg, loss_chunk=chunk)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens, targets = np.random.default_rng(0).integers(0, 77, size=(2, 3, cfg.block_size))
  expected, expected_grads = jax.jit(jax.value_and_grad(functools.partial(_whole_logits_loss, cfg)))(params, tokens, targets)
  actual, grads = jax.jit(jax.value_and_grad(functools.partial(_chunked_loss, chunked_cfg)))(params, tokens, targets)
  np.testing.assert_allclose(actual, expected, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected_grads)


def test_chunks_are_even_and_cover_the_sequence():
  assert loss.chunking(64, 16) == (4, 16)
  assert loss.chunking(64, 24) == (3, 22)
  assert loss.chunking(2048, 512) == (4, 512)
  assert loss.chunking(1021, 512) == (2, 511)
  assert loss.chunking(64, 0) == loss.chunking(64, 64) == loss.chunking(64, 100) == (1, 64)


def test_the_chunked_step_holds_no_whole_float32_logits():
  """In the compiled forward and backward, no array has the shape of the whole [B, T, vocab]."""
  cfg = dataclasses.replace(LLAMA, loss_chunk=16)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = np.zeros((3, cfg.block_size), np.int32)
  whole = f"f32[3,{cfg.block_size},{cfg.padded_vocab}]"
  step = jax.jit(jax.grad(functools.partial(_chunked_loss, cfg))).lower(params, tokens, tokens).compile().as_text()
  reference = jax.jit(jax.grad(functools.partial(_whole_logits_loss, cfg))).lower(params, tokens, tokens).compile().as_text()
  assert whole in reference and whole not in step
  assert f"f32[3,16,{cfg.padded_vocab}]" in step  # a chunk's logits
