"""The server's engine without HTTP: continuous batching over slots of their own lengths equals
generating each request alone; a generation's text is handed over whole (stop sequences, UTF-8)."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

from gptjax import model as model_lib
from gptjax import sample
from gptjax import tokenizer as tokenizer_lib
from gptjax.config import ModelConfig
from gptjax.serve import decode
from gptjax.serve.engine import FINISHED
from gptjax.serve.engine import Engine
from gptjax.serve.engine import Generation
from gptjax.serve.engine import Sampling
from gptjax.serve.engine import Token

GPT2_STYLE = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)
LLAMA_STYLE = dataclasses.replace(GPT2_STYLE, n_kv_head=1, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                  tie_embeddings=False)
CHARS = tokenizer_lib.CharTokenizer("".join(chr(ord("a") + i % 26) if i < 26 else str(i - 26) for i in range(40)))


def _run(engine: Engine, generations_args) -> list[Generation]:
  """Submits every (prompt, sampling) at once and waits for all of them."""
  done = threading.Semaphore(0)
  generations = [Generation(prompt, sampling, CHARS, lambda e: done.release() if e is FINISHED else None)
                 for prompt, sampling in generations_args]
  for generation in generations:
    engine.submit(generation)
  for _ in generations:
    assert done.acquire(timeout=300)
  return generations


@pytest.mark.parametrize("cfg", [GPT2_STYLE, LLAMA_STYLE], ids=["learned_positions", "rotary_gqa"])
def test_requests_batched_in_slots_equal_each_generated_alone(cfg):
  params = model_lib.init_params(cfg, jax.random.key(0))
  engine = Engine(cfg, params, CHARS, None, slots=3).start()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 40, n).tolist() for n in (1, 5, 17, 9, 2)]  # more requests than slots
  lengths = [12, 7, 14, 20, 3]
  generations = _run(engine, [(p, Sampling(max_tokens=n, temperature=0.0)) for p, n in zip(prompts, lengths)])
  for prompt, n, generation in zip(prompts, lengths, generations):
    alone = sample.generate(cfg, params, np.asarray([prompt], np.int32), max_new_tokens=n, rng=jax.random.key(0),
                            temperature=0)[0]
    assert [t.id for t in generation.generated] == alone.tolist()
    assert generation.finish_reason == "length"
  assert engine.running == [None] * 3 and engine.error is None


def test_a_seeded_draw_does_not_depend_on_the_other_slots():
  params = model_lib.init_params(GPT2_STYLE, jax.random.key(1))
  engine = Engine(GPT2_STYLE, params, CHARS, None, slots=4).start()
  sampled = Sampling(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
  alone = _run(engine, [([1, 2, 3], sampled)])[0]
  crowd = _run(engine, [([4], Sampling(max_tokens=10, temperature=0.5, seed=1)), ([1, 2, 3], sampled),
                        ([5, 6], Sampling(max_tokens=4, temperature=0.0))])[1]
  assert [t.id for t in crowd.generated] == [t.id for t in alone.generated]


def test_rows_sampled_with_their_own_settings_keep_only_allowed_tokens():
  logits = jax.random.normal(jax.random.key(0), (3, 40))
  keys = jax.random.split(jax.random.key(1), 3)
  for _ in range(20):
    keys = jax.vmap(lambda k: jax.random.split(k)[0])(keys)
    out = np.asarray(decode.sample_rows(logits, keys, np.array([1.0, 1.0, 0.0], np.float32),
                                        np.array([3, 0, 0], np.int32), np.array([1.0, 0.3, 1.0], np.float32), True))
    assert out[0] in np.argsort(-np.asarray(logits[0]))[:3]
    probs = np.asarray(jax.nn.softmax(logits[1]))
    order = np.argsort(-probs)
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.3) + 1]
    assert out[1] in nucleus
    assert out[2] == int(np.argmax(logits[2]))


def _feed(tokenizer, ids, sampling):
  events = []
  generation = Generation([0], sampling, tokenizer, events.append)
  for i in ids:
    if generation.add(Token(i, None)):
      break
  return generation, events


def test_a_stop_sequence_ends_the_text_before_it_and_nothing_of_it_is_shown_early():
  text_ids = CHARS.encode("abcxyzdef")
  generation, events = _feed(CHARS, text_ids, Sampling(max_tokens=20, stop=("xyz",)))
  pieces = [t.text for event in events if event is not FINISHED for t in event]
  assert "".join(pieces) == "abc" and generation.finish_reason == "stop" and events[-1] is FINISHED
  assert generation.shown == 3  # the stop sequence's tokens are not part of the choice
  generation, events = _feed(CHARS, CHARS.encode("abxyabxa"), Sampling(max_tokens=8, stop=("xyz",)))
  assert "".join(t.text for event in events if event is not FINISHED for t in event) == "abxyabxa"
  assert generation.finish_reason == "length"


def test_characters_split_over_tokens_are_shown_whole():
  gpt2 = tokenizer_lib.GPT2Tokenizer()
  ids = gpt2.encode("naïve 日本語 café")
  assert any("\ufffd" in gpt2.decode([i]) for i in ids)  # some tokens are parts of a character
  generation, events = _feed(gpt2, ids, Sampling(max_tokens=len(ids)))
  pieces = [t.text for event in events if event is not FINISHED for t in event]
  assert "".join(pieces) == "naïve 日本語 café" and not any("\ufffd" in p for p in pieces)
  assert len(pieces) == len(ids)  # every token handed over, the ones inside a character with ""
