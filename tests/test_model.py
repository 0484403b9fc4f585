import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig
from gptjax import model as model_lib

CFG = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _params(cfg=CFG):
  return nn.meta.unbox(model_lib.init_params(cfg, jax.random.key(0)))


def test_changing_a_future_token_never_changes_earlier_logits():
  params = _params()
  tokens = jax.random.randint(jax.random.key(1), (2, CFG.block_size), 0, CFG.vocab_size)
  logits = model_lib.GPT(CFG).apply({"params": params}, tokens)
  for t in (0, 5, CFG.block_size - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    changed_logits = model_lib.GPT(CFG).apply({"params": params}, changed)
    np.testing.assert_array_equal(logits[:, :t], changed_logits[:, :t])
    assert not np.allclose(logits[:, t:], changed_logits[:, t:])  # the change is seen from t on


def test_parameter_names_follow_gpt2():
  params = _params()
  assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
  block = jax.tree_util.tree_map_with_path(lambda path, x: x.shape, params["h_0"])
  assert block["attn"]["c_attn"]["kernel"] == (32, 3, 4, 8)  # GPT-2's [embd, 3 * embd], heads split out
  assert block["attn"]["c_proj"]["kernel"] == (4, 8, 32)
  assert block["mlp"]["c_fc"]["kernel"] == (32, 128)
  assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}


def test_head_is_tied_to_token_embedding():
  params = _params()
  x = jnp.zeros((1, 1), jnp.int32)
  zeroed = jax.tree.map(lambda p: p, params)
  zeroed["wte"] = {"embedding": jnp.zeros_like(params["wte"]["embedding"])}
  logits = model_lib.GPT(CFG).apply({"params": zeroed}, x)
  np.testing.assert_array_equal(logits, 0.0)  # no separate output matrix


def test_decode_with_cache_matches_full_forward():
  params = _params()
  tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, CFG.vocab_size)
  full = model_lib.GPT(CFG).apply({"params": params}, tokens)
  from gptjax.sample import empty_cache
  cache = empty_cache(CFG, 3)
  model = model_lib.GPT(CFG)
  prefill, variables = model.apply({"params": params, "cache": cache}, tokens[:, :7], decode=True, mutable=["cache"])
  steps = [prefill]
  for t in range(7, 12):
    logits, variables = model.apply({"params": params, **variables}, tokens[:, t:t + 1], decode=True, mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_remat_and_dropout_flags():
  cfg = ModelConfig(**{**CFG.__dict__, "remat": True, "dropout": 0.5})
  params = _params(cfg)
  tokens = jnp.ones((2, 8), jnp.int32)
  model = model_lib.GPT(cfg)
  eval_logits = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(eval_logits, model_lib.GPT(CFG).apply({"params": params}, tokens), atol=1e-6)
  train_logits = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(train_logits, eval_logits)


def test_weight_decay_applies_to_matrices_only():
  from gptjax.optim import decay_mask
  mask = decay_mask(_params())
  assert mask["wte"]["embedding"] and mask["wpe"]["embedding"]
  assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["h_1"]["mlp"]["c_proj"]["kernel"]
  assert not mask["h_0"]["attn"]["c_attn"]["bias"]  # rank 3, still a bias
  assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]
