"""The server's compiled work over a fixed set of slots, each a row of one key/value cache with a
length of its own (`KVCache` per row):

- `prefill_slot` writes a prompt's keys and values into one slot's row (the prompt padded to a
  bucket of lengths, so that a few programs serve every prompt);
- `step` extends every slot by one token: one decode of all the slots together, then each row
  sampled with its own temperature, top-k, top-p and seed, with its log-probabilities;
- `score` gives a prompt's own log-probabilities (for `echo` with `logprobs`).

Every row's draw depends only on its request's seed and the token's index, never on its neighbours.
"""

import functools

import jax
import jax.numpy as jnp

from gptjax import model as model_lib
from gptjax.config import ModelConfig
from gptjax.sample import greedy

MAX_LOGPROBS = 5  # the most `logprobs` a request may ask for (OpenAI's limit for completions)
MIN_BUCKET = 16


def bucket(n: int, block_size: int) -> int:
  """The padded length a prompt of `n` tokens is prefilled at: a power of two from 16, at most
  block_size (so about log2(block_size) programs in all)."""
  return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), block_size)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def prefill_slot(params, cache: model_lib.KVCache, slot, tokens_1T, n, *, cfg: ModelConfig):
  """The cache with slot `slot`'s row holding the keys and values of tokens_1T's first `n` tokens
  (the rest is padding, masked by the row's length `n`)."""
  _, fresh = model_lib.bind(cfg, params).prefill(tokens_1T, tokens_1T.shape[1])
  put = lambda stored, new: jax.lax.dynamic_update_slice(stored, new, (slot, 0, 0, 0))  # noqa: E731
  return cache.replace(key=tuple(map(put, cache.key, fresh.key)), value=tuple(map(put, cache.value, fresh.value)),
                       length=cache.length.at[slot].set(n))


def sample_rows(logits_SV, keys_S, temperature_S, top_k_S, top_p_S, filtered: bool):
  """One token per row [S], each row with its own settings: temperature 0 is greedy, top_k 0 and
  top_p 1 disable those (as `gptjax.sample.sample_logits` does for one setting). `filtered`: some
  row uses top-k or top-p (else no sort of the vocabulary is needed)."""
  scaled_SV = logits_SV / jnp.where(temperature_S > 0, temperature_S, 1.0)[:, None]
  if filtered:
    sorted_SV = -jnp.sort(-scaled_SV, axis=-1)
    rank_V = jnp.arange(scaled_SV.shape[-1])
    in_top_k_SV = (top_k_S[:, None] == 0) | (rank_V < top_k_S[:, None])
    kept_SV = jnp.where(in_top_k_SV, sorted_SV, -jnp.inf)
    kth_S1 = jnp.take_along_axis(sorted_SV, jnp.maximum(top_k_S - 1, 0)[:, None], axis=-1)  # the smallest kept
    kth_S1 = jnp.where(top_k_S[:, None] > 0, kth_S1, -jnp.inf)
    probs_SV = jax.nn.softmax(kept_SV, axis=-1)
    mass_before_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV
    in_top_p_SV = in_top_k_SV & (mass_before_SV < top_p_S[:, None])  # (the first token always)
    cutoff_S1 = jnp.min(jnp.where(in_top_p_SV, kept_SV, jnp.inf), axis=-1, keepdims=True)
    scaled_SV = jnp.where((scaled_SV < kth_S1) | (scaled_SV < cutoff_S1), -jnp.inf, scaled_SV)
  drawn_S = jax.vmap(jax.random.categorical)(keys_S, scaled_SV)
  return jnp.where(temperature_S > 0, drawn_S, greedy(logits_SV)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "filtered"), donate_argnames="cache")
def step(params, layers, cache: model_lib.KVCache, tokens_S, active_S, seeds_S, counters_S, temperature_S,
         top_k_S, top_p_S, *, cfg: ModelConfig, filtered: bool):
  """Each slot's next token after `tokens_S` -> (tokens [S], their log-probabilities [S], the
  likeliest tokens [S, MAX_LOGPROBS] and theirs, the cache one longer in the active slots; the
  others' length 0). Log-probabilities are the model's own, before temperature or filtering."""
  logits_SV, cache = model_lib.bind(cfg, params).decode(tokens_S[:, None], cache, layers)
  cache = cache.replace(length=jnp.where(active_S, cache.length, 0))
  keys_S = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed), i))(
      seeds_S, counters_S)
  next_S = sample_rows(logits_SV, keys_S, temperature_S, top_k_S, top_p_S, filtered)
  logprobs_SV = jax.nn.log_softmax(logits_SV, axis=-1)
  top_logprobs_SL, top_ids_SL = jax.lax.top_k(logprobs_SV, MAX_LOGPROBS)
  chosen_S = jnp.take_along_axis(logprobs_SV, next_S[:, None], axis=-1)[:, 0]
  return next_S, chosen_S, top_ids_SL, top_logprobs_SL, cache


@functools.partial(jax.jit, static_argnames="cfg")
def score(params, tokens_1T, *, cfg: ModelConfig):
  """The log-probability of each token after the first given the ones before it [T - 1], and the
  likeliest tokens at each of those positions [T - 1, MAX_LOGPROBS] with theirs."""
  logprobs_TV = jax.nn.log_softmax(model_lib.bind(cfg, params)(tokens_1T)[0, :-1], axis=-1)
  top_logprobs_TL, top_ids_TL = jax.lax.top_k(logprobs_TV, MAX_LOGPROBS)
  chosen_T = jnp.take_along_axis(logprobs_TV, tokens_1T[0, 1:, None], axis=-1)[:, 0]
  return chosen_T, top_ids_TL, top_logprobs_TL


@functools.partial(jax.jit, static_argnames=("cfg", "slots"))
def empty_cache(params, *, cfg: ModelConfig, slots: int) -> model_lib.KVCache:
  """A cache of `slots` rows over the whole context, each row with its own length."""
  return model_lib.bind(cfg, params).init_cache(slots, per_row=True)


@functools.partial(jax.jit, static_argnames="cfg")
def layer_params(params, *, cfg: ModelConfig):
  """Each block's parameters sliced out of its stack once (`GPT.layer_params`), for `step`."""
  return model_lib.bind(cfg, params).layer_params()
