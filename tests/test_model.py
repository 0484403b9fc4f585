import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model as model_lib
from gptjax.config import ModelConfig

CFG = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _params(cfg=CFG):
  return model_lib.init_params(cfg, jax.random.key(0))


def _logits(cfg, params, tokens, **kwargs):
  return model_lib.bind(cfg, params)(tokens, **kwargs)


def test_changing_a_future_token_never_changes_earlier_logits():
  params = _params()
  tokens = jax.random.randint(jax.random.key(1), (2, CFG.block_size), 0, CFG.vocab_size)
  logits = _logits(CFG, params, tokens)
  for t in (0, 5, CFG.block_size - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    changed_logits = _logits(CFG, params, changed)
    np.testing.assert_array_equal(logits[:, :t], changed_logits[:, :t])
    assert not np.allclose(logits[:, t:], changed_logits[:, t:])  # the change is seen from t on


def test_parameter_names_follow_gpt2_with_the_blocks_stacked():
  params = _params()
  assert set(params) == {"wte", "wpe", "h", "ln_f"}
  block = jax.tree.map(lambda x: x.shape, params["h"])
  assert block["attn"]["c_attn"]["kernel"] == (2, 32, 3, 4, 8)  # [layer] + GPT-2's [embd, 3 * embd], heads split out
  assert block["attn"]["c_proj"]["kernel"] == (2, 4, 8, 32)
  assert block["mlp"]["c_fc"]["kernel"] == (2, 32, 128)
  assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
  _, names = model_lib.abstract_params(CFG)
  assert names["h"]["attn"]["c_attn"]["kernel"] == ("layers", "embed", None, "heads", "kv")
  assert names["wte"]["embedding"] == ("vocab", "embed")


def test_head_is_tied_to_token_embedding():
  params = _params()
  zeroed = {**params, "wte": {"embedding": jnp.zeros_like(params["wte"]["embedding"])}}
  np.testing.assert_array_equal(_logits(CFG, zeroed, jnp.zeros((1, 1), jnp.int32)), 0.0)  # no separate output matrix


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decode_with_the_models_cache_matches_full_forward(scan_layers):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, CFG.vocab_size)
  model = model_lib.bind(cfg, params)
  cache = model.init_cache(3)
  assert [k.shape for k in cache.key] == [(3, 4, CFG.block_size, 8)] * 2  # per layer [batch, head, position, head_dim]
  next_logits = [model.decode(tokens[:, :7], cache)[0]]  # the prompt at once: the next token's logits
  cache = model.init_cache(3, length=12)  # a cache just long enough
  for t in range(12):
    logits, cache = model.decode(tokens[:, t:t + 1], cache, model.layer_params() if t % 2 else None)
    next_logits.append(logits)
  assert int(cache.length) == 12
  full = model(tokens)
  np.testing.assert_allclose(next_logits[0], full[:, 6], atol=1e-5)
  np.testing.assert_allclose(jnp.stack(next_logits[1:], axis=1), full, atol=1e-5)


def _loss_and_grads(cfg, params, tokens, dropout_key=None):
  def loss(params):
    return jnp.mean(_logits(cfg, params, tokens, dropout_key=dropout_key) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_scan_and_remat_compute_the_same_loss_and_gradients(remat, scan_layers):
  params = _params()
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, CFG.vocab_size)
  reference = _loss_and_grads(CFG, params, tokens)
  other = _loss_and_grads(dataclasses.replace(CFG, remat=remat, scan_layers=scan_layers), params, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), other, reference)


def test_dropout_needs_a_key_and_the_key_fixes_the_mask():
  cfg = dataclasses.replace(CFG, dropout=0.5)
  params = _params(cfg)
  tokens = jnp.ones((2, 8), jnp.int32)
  eval_logits = _logits(cfg, params, tokens)
  np.testing.assert_allclose(eval_logits, _logits(CFG, params, tokens), atol=1e-6)  # no key: no dropout
  train_logits = _logits(cfg, params, tokens, dropout_key=jax.random.key(0))
  assert not np.allclose(train_logits, eval_logits)
  np.testing.assert_array_equal(train_logits, _logits(cfg, params, tokens, dropout_key=jax.random.key(0)))
  unrolled = dataclasses.replace(cfg, scan_layers=False)  # the same masks, scanned or not
  np.testing.assert_allclose(_logits(unrolled, params, tokens, dropout_key=jax.random.key(0)), train_logits, atol=1e-5)


def test_flops_per_token_count_every_multiplying_parameter_but_not_positions():
  # GPT-2 124M: 124,439,808 parameters, of which the position table is 1024 x 768.
  gpt2 = ModelConfig()
  assert model_lib.count_params(model_lib.abstract_params(gpt2)[0]) == 124_439_808
  attention = 12 * 12 * 768 * 1024
  assert model_lib.flops_per_token(gpt2) == 6 * (124_439_808 - 1024 * 768) + attention
  wider = dataclasses.replace(gpt2, block_size=2048)  # a longer position table costs no FLOPs itself
  assert model_lib.flops_per_token(wider) - model_lib.flops_per_token(gpt2) == attention


def test_weight_decay_applies_to_matrices_only():
  from gptjax.optim import decay_mask
  mask = decay_mask(_params())
  assert mask["wte"]["embedding"] and mask["wpe"]["embedding"]
  assert mask["h"]["attn"]["c_attn"]["kernel"] and mask["h"]["mlp"]["c_proj"]["kernel"]
  assert not mask["h"]["attn"]["c_attn"]["bias"]  # rank 4 when stacked, still a bias
  assert not mask["h"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_a_padded_vocabulary_changes_no_logit_and_its_padding_is_never_chosen():
  cfg = ModelConfig(vocab_size=77, block_size=16, n_layer=1, n_head=2, n_embd=16, dtype="float32")
  padded = dataclasses.replace(cfg, vocab_multiple=8)
  params = model_lib.init_params(padded, jax.random.key(0))
  assert params["wte"]["embedding"].shape == (80, 16)
  tokens = np.arange(12)[None] % 77
  logits = np.asarray(model_lib.bind(padded, params)(tokens))
  unpadded = {**params, "wte": {"embedding": params["wte"]["embedding"][:77]}}
  np.testing.assert_array_equal(logits[..., :77], np.asarray(model_lib.bind(cfg, unpadded)(tokens)))
  assert (logits[..., 77:] == np.finfo(np.float32).min).all()


@pytest.mark.parametrize("block_size,n_kv_head", [(16, 0), (70, 2)])  # 70: blocks of 17 and a last one of 2
def test_blocked_causal_attention_equals_the_full_masked_softmax(block_size, n_kv_head):
  cfg = dataclasses.replace(CFG, block_size=block_size, n_kv_head=n_kv_head)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(3), (2, block_size), 0, cfg.vocab_size)
  xla, blocked = (dataclasses.replace(cfg, attention=attention) for attention in ("xla", "blocked"))
  np.testing.assert_allclose(_logits(blocked, params, tokens), _logits(xla, params, tokens), atol=1e-5)
  (xla_loss, xla_grads), (blocked_loss, blocked_grads) = (_loss_and_grads(c, params, tokens) for c in (xla, blocked))
  np.testing.assert_allclose(blocked_loss, xla_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), blocked_grads, xla_grads)


def test_bfloat16_logits_are_float32_and_near_float32s():
  params = _params()
  tokens = jax.random.randint(jax.random.key(4), (2, CFG.block_size), 0, CFG.vocab_size)
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  logits = _logits(bf16, params, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _logits(CFG, params, tokens), atol=0.05)
  _, grads = _loss_and_grads(bf16, params, tokens)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {np.dtype("float32")}


@pytest.mark.parametrize("attention", ["blocked", "xla"])
def test_prefill_attends_with_the_kernel_and_fills_the_cache_as_decoding_would(attention):
  cfg = dataclasses.replace(CFG, attention=attention, n_kv_head=2)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(5), (2, 11), 0, cfg.vocab_size)
  model = model_lib.bind(cfg, params)
  prefilled_logits, prefilled = model.prefill(tokens, 16)
  decoded_logits, decoded = model.decode(tokens, model.init_cache(2, 16))  # attends over the cache
  np.testing.assert_allclose(prefilled_logits, _logits(cfg, params, tokens)[:, -1], atol=1e-5)
  np.testing.assert_allclose(prefilled_logits, decoded_logits, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), prefilled, decoded)
  assert int(prefilled.length) == 11
