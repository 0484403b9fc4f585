"""The HTTP API (FastAPI): OpenAI's `/v1/completions` and, where the tokenizer has a chat
template, `/v1/chat/completions` (both streamed as server-sent events too), `/v1/models`, `/health`, and the tokenizer endpoints lm-evaluation-harness's `local-completions`
uses (`/tokenizer_info`, `/tokenize`, `/detokenize`, as vLLM has them). Every request is checked
before it reaches the engine; a bad one gets an OpenAI error body and a 4xx status."""

import asyncio
import dataclasses
import json
import time

from fastapi import FastAPI
from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from gptjax.serve import protocol
from gptjax.serve.engine import FINISHED
from gptjax.serve.engine import Engine
from gptjax.serve.engine import Generation
from gptjax.serve.protocol import BadRequest

WAKE_SECONDS = 0.5  # how often a waiting request looks whether its client is still there


def create_app(engine: Engine, model_name: str) -> FastAPI:
  app = FastAPI(title="gptjax", docs_url=None, redoc_url=None)
  tok, cfg = engine.tokenizer, engine.cfg

  @app.exception_handler(BadRequest)
  async def refuse(_, error: BadRequest):
    return JSONResponse(error.body(), status_code=error.status)

  @app.get("/health")
  async def health():
    if engine.error is not None:
      return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
    return {"status": "ok", "slots": engine.slots, "busy": sum(g is not None for g in engine.running),
            "waiting": engine.waiting.qsize()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptjax",
                                        "max_model_len": cfg.block_size}]}

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return {"eos_token": protocol.special_text(tok, tok.eot_id), "bos_token": protocol.special_text(tok, tok.bos_id),
            "pad_token": None,
            "model_max_length": cfg.block_size, "tokenizer_class": type(tok).__name__,
            "chat_template": getattr(tok, "chat_template", None)}

  @app.post("/tokenize")
  async def tokenize(request: Request):
    text = (await _body(request)).get("prompt")
    if not isinstance(text, str):
      raise BadRequest("prompt must be a text", "prompt")
    tokens = _encode_with_special(tok, text)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": cfg.block_size}

  @app.post("/detokenize")
  async def detokenize(request: Request):
    tokens = (await _body(request)).get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in tokens):
      raise BadRequest(f"tokens must be a list of token ids in [0, {cfg.vocab_size})", "tokens")
    return {"prompt": tok.decode(tokens)}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await _checked_body(request)
    sampling, n = protocol.sampling(body, cfg.vocab_size)
    prompts = protocol.prompts(body, tok, cfg.vocab_size)
    return await _respond(request, body, prompts, sampling, n, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await _checked_body(request)
    prompt = protocol.chat_prompt(body, tok)
    if body.get("max_completion_tokens") is not None:
      body["max_tokens"] = body["max_completion_tokens"]
    body.setdefault("max_tokens", max(cfg.block_size - len(prompt), 1))  # the rest of the context
    if body.get("logprobs") or body.get("echo"):
      raise BadRequest("logprobs and echo are served by /v1/completions, not for chat", "logprobs")
    sampling, n = protocol.sampling(body, cfg.vocab_size)
    return await _respond(request, body, [prompt], sampling, n, chat=True)

  async def _checked_body(request: Request) -> dict:
    body = await _body(request)
    if body.get("model") not in (None, model_name):
      raise BadRequest(f"the model {body.get('model')!r} does not exist; this server has {model_name!r}", "model",
                       status=404, code="model_not_found")
    if engine.error is not None:
      raise BadRequest(f"the engine has stopped: {engine.error!r}", status=503)
    return body

  async def _respond(request: Request, body: dict, prompts: list[list[int]], sampling, n: int, chat: bool):
    """Submits n choices of each prompt; answers when all have finished, or streams them."""
    for prompt in prompts:
      protocol.check_length(prompt, sampling.max_tokens, cfg.block_size)
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    generations = []
    for prompt in prompts:
      for _ in range(n):
        index = len(generations)  # each choice its own seed
        seeded = dataclasses.replace(sampling, seed=(sampling.seed + index * 0x9E3779B1) % 2**32)
        on_event = lambda event, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, event))  # noqa: E731
        generations.append(Generation(prompt, seeded, tok, on_event))
    for generation in generations:
      engine.submit(generation)
    choices = [_Choice(g, tok, chat) for g in generations]
    if body.get("stream", False):
      usage = bool((body.get("stream_options") or {}).get("include_usage"))
      return EventSourceResponse(_stream(choices, events, model_name, usage), ping=15)
    return await _complete(request, choices, events, model_name)

  return app


async def _body(request: Request) -> dict:
  try:
    body = json.loads(await request.body())
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(f"the request body is not valid JSON: {e}") from None
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object")
  return body


def _encode_with_special(tok, text: str) -> list[int]:
  """`text`'s tokens, the end-of-text and beginning-of-sequence tokens' texts read as those tokens
  (lm-eval learns the end-of-text id by tokenizing its text), everything else as `tok.encode`."""
  specials = {protocol.special_text(tok, i): i for i in (tok.eot_id, tok.bos_id) if i is not None}
  tokens, rest = [], text
  while rest:
    found = [(rest.find(s), s) for s in specials if s in rest]
    if not found:
      return tokens + tok.encode(rest)
    at, special = min(found)
    tokens += tok.encode(rest[:at]) + [specials[special]]
    rest = rest[at + len(special):]
  return tokens


class _Choice:
  """What a response shows of one generation: its text and tokens so far, as a completion's choice
  or a chat completion's (a message; in a stream, deltas)."""

  def __init__(self, generation: Generation, tok, chat: bool):
    self.generation, self.tok, self.chat = generation, tok, chat
    self.tokens, self.text = [], ""

  def take(self, tokens) -> str:
    """Adds `tokens` (the prompt's, with echo, then generated ones) -> their text."""
    text = "".join(t.text for t in tokens)
    self.tokens += tokens
    self.text += text
    return text

  def body(self, index: int, text: str, tokens: list, offset: int, finished: bool, delta: bool = False) -> dict:
    """The choice with `text` (`tokens`, from `offset` of the choice's text): all of it, or in a
    stream (`delta`) what is new."""
    finish_reason = self.generation.finish_reason if finished else None
    if self.chat:
      content = {"content": text} | ({"role": "assistant"} if not delta or offset == 0 else {})
      return {"index": index, ("delta" if delta else "message"): content, "logprobs": None,
              "finish_reason": finish_reason}
    logprobs = None
    if self.generation.sampling.logprobs is not None:
      logprobs = protocol.logprobs_body(tokens, self.tok, offset)
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _usage(generations: list[Generation]) -> dict:
  prompt = sum(len(g.prompt) for g in generations)
  completion = sum(g.shown for g in generations)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_finished(generations: list[Generation]) -> None:
  if any(g.finish_reason == "error" for g in generations):
    raise BadRequest("the engine failed while generating", status=500)


async def _complete(request: Request, choices: list[_Choice], events: asyncio.Queue, model: str):
  generations = [c.generation for c in choices]
  remaining, checked = len(generations), time.monotonic()
  try:
    while remaining:
      try:
        index, event = await asyncio.wait_for(events.get(), WAKE_SECONDS)
      except asyncio.TimeoutError:
        index, event = None, None
      if time.monotonic() - checked > WAKE_SECONDS:  # also while tokens keep coming
        if await request.is_disconnected():
          return JSONResponse({}, status_code=499)
        checked = time.monotonic()
      if event is None:
        continue
      if event is FINISHED:
        remaining -= 1
      else:
        choices[index].take(event)
  finally:
    for generation in generations:
      generation.cancelled = True  # those still running free their slots (finished ones: no effect)
  _check_finished(generations)
  return protocol.completion(model, [c.body(i, c.text, c.tokens, 0, True) for i, c in enumerate(choices)],
                             _usage(generations), chat=choices[0].chat)


async def _stream(choices: list[_Choice], events: asyncio.Queue, model: str, usage: bool):
  """Server-sent events: a chunk per handed-over list of tokens, one with each finish reason,
  (`usage`: one with the token counts) then [DONE]; a client that leaves cancels its generations
  (the generator is closed). A failed engine ends the stream with an error body."""
  generations, chat = [c.generation for c in choices], choices[0].chat
  object_id = protocol.completion(model, [], chat=chat)["id"]
  remaining = len(generations)
  try:
    while remaining:
      index, event = await events.get()
      choice = choices[index]
      if event is FINISHED:
        remaining -= 1
        if choice.generation.finish_reason == "error":
          yield json.dumps(BadRequest("the engine failed while generating", status=500).body())
          return
        chunk = choice.body(index, "", [], len(choice.text), True, delta=True)
      else:
        offset = len(choice.text)
        chunk = choice.body(index, choice.take(event), event, offset, False, delta=True)
      yield json.dumps(protocol.completion(model, [chunk], object_id=object_id, chat=chat, chunk=True))
    if usage:
      yield json.dumps(protocol.completion(model, [], _usage(generations), object_id, chat=chat, chunk=True))
    yield "[DONE]"
  finally:
    for generation in generations:
      generation.cancelled = True
