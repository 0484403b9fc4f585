"""Continuous batching: requests decoded together in a fixed set of slots over one key/value cache.

One thread owns the device work. Each turn it admits waiting generations into free slots (scoring
the prompt where `echo` asks for its log-probabilities, then prefilling it into the slot's row),
runs one `decode.step` over every slot, and hands each active slot's token to its generation, which
says whether it has finished (end-of-text, a stop sequence, `max_tokens`) or was cancelled (its
client left): then the slot is free for the next waiting one at the following step. Shapes never
change with the traffic, so the step compiles once (twice: with and without top-k/top-p filtering)
and each prompt bucket once.
"""

import dataclasses
import queue
import threading

import jax
import numpy as np

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.serve import decode

FINISHED = object()  # what a generation's `on_event` receives last
CONTEXT_TOKENS = 4  # the prompt tokens a generation's text is decoded after


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one choice is generated (a request's settings, already checked)."""
  max_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  logprobs: int | None = None  # how many likeliest tokens to report per position; None: no log-probabilities
  echo: bool = False


@dataclasses.dataclass
class Token:
  """A token as a response shows it: its id, its text (the characters it completes), its
  log-probability and the likeliest tokens' {id: log-probability} (None where not asked for)."""
  id: int
  text: str
  logprob: float | None = None
  top: dict | None = None


class Generation:
  """One choice being generated: its prompt, its settings, and `on_event`, called from the engine's
  thread with lists of Tokens whose text is final (the prompt's first, with `echo`) and at the end
  with FINISHED, after `finish_reason` is set ("stop" or "length"; "error" if the engine failed).
  The tokens' texts put together are the choice's text: stop sequences and what follows them left
  out, and nothing shown that could still turn out to begin a stop sequence or complete a character."""

  def __init__(self, prompt: list[int], sampling: Sampling, tokenizer, on_event):
    self.prompt, self.sampling, self.tokenizer, self.on_event = prompt, sampling, tokenizer, on_event
    self.generated: list[Token] = []
    self.shown = 0  # how many of the generated tokens have been handed over
    self.text = ""  # their text
    self.finish_reason: str | None = None
    self.cancelled = False  # set by the server when the client has gone: the slot is freed at the next step
    self._context = prompt[-CONTEXT_TOKENS:]  # decoded before the new tokens, for the characters they add
    self._context_text = tokenizer.decode(self._context)

  def add(self, token: Token) -> bool:
    """Takes the next token; True once the generation has finished."""
    if token.id == self.tokenizer.eot_id:  # handed over with its log-probabilities, as text ""
      return self._show(self._decoded(len(self.generated)), finish="stop", last=token)
    self.generated.append(token)
    text = self._decoded(len(self.generated))
    if stops := [at for stop in self.sampling.stop if (at := text.find(stop)) >= 0]:
      return self._show(text[:min(stops)], finish="stop", cut=True)
    if len(self.generated) == self.sampling.max_tokens:
      return self._show(text, finish="length")
    held = max((n for stop in self.sampling.stop for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
               default=0)  # what may yet begin a stop sequence
    return self._show(text[:len(text) - held])

  def _decoded(self, n: int) -> str:
    """The text of the first `n` generated tokens, as they read after the prompt (a tokenizer may
    write a token differently at the start of a text, as SentencePiece drops a leading space)."""
    text = self.tokenizer.decode(self._context + [t.id for t in self.generated[:n]])
    return text[len(self._context_text):] if text.startswith(self._context_text) else text

  def _show(self, visible: str, finish: str | None = None, cut: bool = False, last: Token | None = None) -> bool:
    """Hands over the tokens whose text `visible` now holds whole, and, finishing, the rest
    (`_rest`) and the end-of-text token `last` (text "")."""
    ready = self._whole(visible)
    if finish:
      ready += self._rest(visible, cut)
      if last is not None:
        last.text = ""
        self.generated.append(last)
        self.shown += 1
        ready.append(last)
    if ready:
      self.on_event(ready)
    if finish:
      self.finish_reason = finish
      self.on_event(FINISHED)
    return finish is not None

  def _whole(self, visible: str) -> list[Token]:
    """The tokens not handed over whose text `visible` holds whole: a token inside a character
    gets "", the one completing it the character."""
    ready, pending = [], []
    for i in range(self.shown, len(self.generated)):
      pending.append(self.generated[i])
      decoded = self._decoded(i + 1)
      if decoded.endswith("\ufffd") or len(decoded) > len(visible):
        continue
      for token in pending:
        token.text = ""
      pending[-1].text = visible[len(self.text):len(decoded)]
      self.text, self.shown = visible[:len(decoded)], i + 1
      ready, pending = ready + pending, []
    return ready

  def _rest(self, visible: str, cut: bool) -> list[Token]:
    """Finishing: the rest of `visible` goes to the next token; after a stop sequence (`cut`) the
    tokens past it are left out, else every token is handed over."""
    pending = self.generated[self.shown:]
    if not pending or (cut and len(self.text) == len(visible)):
      return []
    pending = pending[:1] if cut else pending
    for token in pending:
      token.text = ""
    pending[0].text = visible[len(self.text):]
    self.text, self.shown = visible, self.shown + len(pending)
    return pending


class Engine:
  """`slots` rows of one cache, stepped together in a thread of their own (`start`)."""

  def __init__(self, cfg: ModelConfig, params, tokenizer, mesh: jax.sharding.Mesh | None, slots: int):
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    self.slots = -(-slots // sharding.batch_shards(mesh)) * sharding.batch_shards(mesh)
    with sharding.on_mesh(mesh):
      self.layers = decode.layer_params(params, cfg=cfg)
      self.cache = decode.empty_cache(params, cfg=cfg, slots=self.slots)
    self.running: list[Generation | None] = [None] * self.slots
    self.waiting: queue.Queue[Generation] = queue.Queue()
    self.next_tokens = np.zeros(self.slots, np.int32)
    self.counters = np.zeros(self.slots, np.int32)
    self._wake = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="gptjax-engine", daemon=True)
    self._lock = threading.Lock()  # between a failing engine and a request arriving
    self._admitting: Generation | None = None
    self._closed = False
    self.error: BaseException | None = None

  def start(self) -> "Engine":
    self._thread.start()
    return self

  def close(self) -> None:
    """Stops the engine's thread once the generations under way have finished."""
    self._closed = True
    self._wake.set()
    self._thread.join()

  def submit(self, generation: Generation) -> None:
    with self._lock:
      if self.error is None:
        self.waiting.put(generation)
        self._wake.set()
        return
    _fail(generation)

  def _loop(self) -> None:
    try:
      while True:
        self._admit()
        if not any(self.running):
          if self._closed and self.waiting.empty():
            return
          self._wake.wait()
          self._wake.clear()
          continue
        self._step()
    except BaseException as e:  # the server answers every later request with this error
      with self._lock:
        self.error = e
      for generation in [g for g in self.running if g] + [self._admitting] + list(self.waiting.queue):
        if generation is not None and generation.finish_reason is None:
          _fail(generation)

  def _admit(self) -> None:
    """Waiting generations into free slots, in the order they came."""
    while None in self.running and not self.waiting.empty():
      generation = self._admitting = self.waiting.get()
      if generation.cancelled:
        continue
      if generation.sampling.echo:
        generation.on_event(self._prompt_tokens(generation))
      slot = self.running.index(None)
      prompt = generation.prompt
      padded = np.zeros((1, decode.bucket(len(prompt) - 1, self.cfg.block_size)), np.int32)
      padded[0, :len(prompt) - 1] = prompt[:-1]  # the last prompt token is the slot's first step
      # One prompt: run outside the mesh's activation constraints, which would split its one row.
      self.cache = decode.prefill_slot(self.params, self.cache, np.int32(slot), padded, np.int32(len(prompt) - 1),
                                       cfg=self.cfg)
      self.running[slot], self.next_tokens[slot], self.counters[slot] = generation, prompt[-1], 0
      self._admitting = None

  def _prompt_tokens(self, generation: Generation) -> list[Token]:
    """The prompt as Tokens, each after the first with its log-probabilities where asked for."""
    prompt, tok, wanted = generation.prompt, self.tokenizer, generation.sampling.logprobs
    tokens = [Token(i, tok.decode([i])) for i in prompt]
    if wanted is not None and len(prompt) > 1:
      padded = np.zeros((1, decode.bucket(len(prompt), self.cfg.block_size)), np.int32)
      padded[0, :len(prompt)] = prompt
      chosen, top_ids, top_logprobs = jax.device_get(decode.score(self.params, padded, cfg=self.cfg))
      for i, token in enumerate(tokens[1:]):
        token.logprob, token.top = float(chosen[i]), _top(top_ids[i], top_logprobs[i], wanted)
    return tokens

  def _step(self) -> None:
    rows = [(g.sampling if g else Sampling(max_tokens=0, temperature=0.0)) for g in self.running]
    temperature = np.array([s.temperature for s in rows], np.float32)
    top_k = np.array([s.top_k for s in rows], np.int32)
    top_p = np.array([s.top_p for s in rows], np.float32)
    active = np.array([g is not None for g in self.running])
    seeds = np.array([s.seed for s in rows], np.uint32)
    with sharding.on_mesh(self.mesh):
      out = decode.step(self.params, self.layers, self.cache, self.next_tokens, active, seeds, self.counters,
                        temperature, top_k, top_p, cfg=self.cfg,
                        filtered=bool(((top_k > 0) | (top_p < 1)).any()))
    next_tokens, chosen, top_ids, top_logprobs, self.cache = out
    next_tokens, chosen, top_ids, top_logprobs = jax.device_get((next_tokens, chosen, top_ids, top_logprobs))
    for slot, generation in enumerate(self.running):
      if generation is None:
        continue
      wanted = generation.sampling.logprobs
      token = Token(int(next_tokens[slot]), None, None if wanted is None else float(chosen[slot]),
                    None if wanted is None else _top(top_ids[slot], top_logprobs[slot], wanted))
      if generation.cancelled or generation.add(token):
        self.running[slot] = None
      self.next_tokens[slot], self.counters[slot] = token.id, self.counters[slot] + 1


def _fail(generation: Generation) -> None:
  generation.finish_reason = "error"
  generation.on_event(FINISHED)


def _top(ids, logprobs, wanted: int) -> dict:
  return {int(i): float(lp) for i, lp in zip(ids[:wanted], logprobs[:wanted])}
