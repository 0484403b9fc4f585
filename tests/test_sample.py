import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model as model_lib
from gptjax import sample
from gptjax.config import ModelConfig

from conftest import run_cli

CFG = ModelConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=32)


def _params(seed=0):
  return model_lib.init_params(CFG, jax.random.key(seed))


def _greedy_by_full_forward(params, prompt, n_new):
  """Reference: re-run the whole sequence for every new token, take the argmax. The sequence is
  padded to block_size (one compile); causality makes the padding invisible to earlier logits."""
  forward = jax.jit(lambda tokens: model_lib.bind(CFG, params)(tokens))
  tokens = np.zeros((prompt.shape[0], CFG.block_size), np.int32)
  tokens[:, :prompt.shape[1]] = prompt
  for t in range(prompt.shape[1], prompt.shape[1] + n_new):
    tokens[:, t] = np.argmax(forward(tokens)[:, t - 1], axis=-1)
  return tokens[:, prompt.shape[1]:prompt.shape[1] + n_new]


def test_greedy_with_kv_cache_equals_full_reforward():
  params = _params()
  prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 5)).astype(np.int32)
  n_new = CFG.block_size - prompt.shape[1]
  cached = sample.generate(CFG, params, prompt, max_new_tokens=n_new, rng=jax.random.key(0), temperature=0)
  np.testing.assert_array_equal(cached, _greedy_by_full_forward(params, prompt, n_new))


def test_top_k_one_is_greedy_and_seed_makes_samples_repeatable():
  params = _params()
  prompt = np.zeros((2, 3), np.int32)
  greedy = sample.generate(CFG, params, prompt, max_new_tokens=10, rng=jax.random.key(0), temperature=0)
  top1 = sample.generate(CFG, params, prompt, max_new_tokens=10, rng=jax.random.key(5), temperature=1.0, top_k=1)
  np.testing.assert_array_equal(greedy, top1)
  a = sample.generate(CFG, params, prompt, max_new_tokens=10, rng=jax.random.key(7), temperature=1.0)
  b = sample.generate(CFG, params, prompt, max_new_tokens=10, rng=jax.random.key(7), temperature=1.0)
  np.testing.assert_array_equal(a, b)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  top_k = jax.vmap(lambda k: sample.sample_logits(logits, k, temperature=1.0, top_k=2, top_p=1.0)[0])(keys)
  assert set(np.unique(top_k)) == {0, 1}
  top_p = jax.vmap(lambda k: sample.sample_logits(logits, k, temperature=1.0, top_k=0, top_p=0.9)[0])(keys)
  assert set(np.unique(top_p)) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 needs the third token
  free = jax.vmap(lambda k: sample.sample_logits(logits, k, temperature=1.0, top_k=0, top_p=1.0)[0])(keys)
  assert set(np.unique(free)) == {0, 1, 2, 3}
  assert abs(np.mean(np.asarray(free) == 0) - 0.5) < 0.05


def test_generation_stops_at_end_of_text():
  params = _params()
  prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 3)).astype(np.int32)
  free = sample.generate(CFG, params, prompt, max_new_tokens=12, rng=jax.random.key(0), temperature=1.0)
  eot = int(free[0, 3])  # call the 4th token sampled for row 0 end-of-text
  out = sample.generate(CFG, params, prompt, max_new_tokens=12, rng=jax.random.key(0), temperature=1.0, eot_id=eot)
  ends = [list(row).index(eot) if eot in row else None for row in free]
  assert ends[0] <= 3
  if ends[1] is not None:  # every sample finished: the loop stopped early
    assert out.shape[1] == max(ends) + 1
  for row, end in enumerate(ends):
    stop = out.shape[1] if end is None else end + 1
    np.testing.assert_array_equal(out[row, :stop], free[row, :stop])  # same draws up to end-of-text
    assert np.all(out[row, stop:] == eot)  # then only end-of-text padding


def test_generation_longer_than_the_context_slides_the_window():
  params = _params()
  out = sample.generate(CFG, params, np.zeros((1, 4), np.int32), max_new_tokens=3 * CFG.block_size,
                        rng=jax.random.key(0), temperature=1.0)
  assert out.shape == (1, 3 * CFG.block_size)
  assert out.min() >= 0 and out.max() < CFG.vocab_size


def test_sample_command_prints_text_from_a_checkpoint(tiny_run):
  out_dir, _ = tiny_run
  result = run_cli("sample", "--checkpoint", out_dir, "--prompt", "ROMEO:", "--num-samples", 2,
                   "--max-new-tokens", 40, "--seed", 3)
  assert result.returncode == 0, result.stderr
  samples = result.stdout.split("---------------\n")
  assert len([s for s in samples if s.strip()]) == 2
  assert all(s.startswith("ROMEO:") and len(s) >= 40 for s in samples if s.strip())
  again = run_cli("sample", "--checkpoint", out_dir, "--prompt", "ROMEO:", "--num-samples", 2,
                  "--max-new-tokens", 40, "--seed", 3)
  assert again.stdout == result.stdout  # the seed fixes the samples
