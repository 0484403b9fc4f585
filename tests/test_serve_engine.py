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


@pytest.mark.parametrize("cfg", [pytest.param(GPT2_STYLE, marks=pytest.mark.slow),  # learned positions per row:
                                 LLAMA_STYLE], ids=["learned_positions", "rotary_gqa"])  # also test_serve's greedy
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
  logits = jax.random.normal(jax.random.key(0), (4, 40)) * 0.1  # flat: every token likely enough to be drawn
  sample_rows = jax.jit(decode.sample_rows, static_argnames="filtered")
  drawn = []
  for i in range(200):
    keys = jax.random.split(jax.random.key(i), 4)
    drawn.append(np.asarray(sample_rows(logits, keys, np.array([1.0, 1.0, 0.0, 1.0], np.float32),
                                        np.array([3, 0, 0, 5], np.int32), np.array([1.0, 0.3, 1.0, 0.5], np.float32),
                                        filtered=True)))
  drawn = np.stack(drawn)
  order = np.argsort(-np.asarray(logits), axis=-1)
  assert set(drawn[:, 0]) == set(order[0, :3])  # top-k alone: the 3 likeliest, each of them
  probs = np.asarray(jax.nn.softmax(logits[1]))
  nucleus = order[1, :np.searchsorted(np.cumsum(probs[order[1]]), 0.3) + 1]
  assert set(drawn[:, 1]) == set(nucleus)
  assert (drawn[:, 2] == int(np.argmax(logits[2]))).all()
  top5 = np.asarray(jax.nn.softmax(logits[3][order[3, :5]]))
  assert set(drawn[:, 3]) == set(order[3, :np.searchsorted(np.cumsum(top5), 0.5) + 1])  # top-p within the top 5


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


def test_end_of_text_is_handed_over_with_its_log_probability():
  gpt2 = tokenizer_lib.GPT2Tokenizer()
  events = []
  generation = Generation([0], Sampling(max_tokens=5, logprobs=1), gpt2, events.append)
  generation.add(Token(gpt2.encode(" Hi")[0], None, -1.5, {1: -1.0}))
  assert generation.add(Token(gpt2.eot_id, None, -0.25, {gpt2.eot_id: -0.25}))
  tokens = [t for event in events if event is not FINISHED for t in event]
  assert [(t.text, t.logprob) for t in tokens] == [(" Hi", -1.5), ("", -0.25)]  # lm-eval reads the last one
  assert generation.text == " Hi" and generation.finish_reason == "stop" and generation.shown == 2


def test_a_stop_sequence_ends_at_the_first_of_several():
  generation, events = _feed(CHARS, CHARS.encode("abcdefg"), Sampling(max_tokens=20, stop=("ef", "cd")))
  assert generation.text == "ab" and generation.finish_reason == "stop"


def test_slots_split_over_a_mesh_give_what_one_device_gives(tiny_run):
  """The checkpoint placed as `gptjax serve mesh.data=4 mesh.tensor=2` places it, on 8 devices."""
  from gptjax import checkpoint
  from gptjax import sharding
  out, _ = tiny_run
  prompts = ["ROMEO:\nWhat light is"[:n] for n in (3, 9, 1, 14, 6)]
  got = {}
  for overrides in ([], ["mesh.data=4", "mesh.tensor=2"]):
    mesh = sharding.inference_mesh(overrides, jax.devices()[:8] if overrides else jax.devices()[:1])
    cfg, meta, params, _ = checkpoint.load_for_inference(str(out), "best", mesh)
    tok = tokenizer_lib.from_meta(meta)
    engine = Engine(cfg.model, params, tok, mesh, slots=3).start()
    assert engine.slots == (4 if overrides else 3)  # a multiple of the batch shards
    done = threading.Semaphore(0)
    generations = [Generation(tok.encode(p), Sampling(max_tokens=10, temperature=0.0), tok,
                              lambda e: done.release() if e is FINISHED else None) for p in prompts]
    for generation in generations:
      engine.submit(generation)
    for _ in generations:
      assert done.acquire(timeout=300)
    engine.close()
    got[bool(overrides)] = [generation.text for generation in generations]
  assert got[True] == got[False] and all(len(text) == 10 for text in got[True])

