"""OpenAI's completions request, checked, and the parts of its response: what a request may say,
and the error (an OpenAI error body, status 4xx) for what it may not."""

import functools
import math
import time
import uuid

from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.serve import decode
from gptjax.serve.engine import Sampling
from gptjax.serve.engine import Token


class BadRequest(Exception):
  """A request the server refuses: answered with an OpenAI error body and `status`."""

  def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
    super().__init__(message)
    self.param, self.status, self.code = param, status, code

  def body(self) -> dict:
    kind = "invalid_request_error" if self.status < 500 else "server_error"
    return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, kind=float):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
    raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}", name)
  if not math.isfinite(value):
    raise BadRequest(f"{name} must be a finite number, not {value}", name)
  return kind(value)


def prompts(body: dict, tokenizer, vocab_size: int) -> list[list[int]]:
  """The request's prompts as token ids: `prompt` is a text, a list of ids, or a list of either."""
  prompt = body.get("prompt")
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt)):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise BadRequest("prompt must be a text, a list of token ids, or a non-empty list of those", "prompt")
  out = []
  for item in prompt:
    if isinstance(item, str):
      ids = _encode(tokenizer, item)
    elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
      if bad := [x for x in item if not 0 <= x < vocab_size]:
        raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
      ids = list(item)
    else:
      raise BadRequest("each prompt must be a text or a list of token ids", "prompt")
    if not ids:
      if tokenizer.eot_id is None:
        raise BadRequest("an empty prompt needs a tokenizer with end-of-text", "prompt")
      ids = [tokenizer.eot_id]  # a sample from nothing starts after end-of-text, as `gptjax sample` does
    out.append(ids)
  return out


def _encode(tokenizer, text: str) -> list[int]:
  try:
    return tokenizer_lib.encode_sequence(tokenizer, text)
  except UserError as e:  # a character the model has no token for
    raise BadRequest(str(e), "prompt") from None


def sampling(body: dict, vocab_size: int) -> tuple[Sampling, int]:
  """(the settings of each choice, n) from a completions request."""
  max_tokens = _number(body, "max_tokens", 16, int)
  if max_tokens <= 0:
    raise BadRequest(f"max_tokens must be at least 1, not {max_tokens}", "max_tokens")
  temperature = _number(body, "temperature", 1.0)
  if not 0 <= temperature <= 2:
    raise BadRequest(f"temperature must be in [0, 2], not {temperature}", "temperature")
  top_p = _number(body, "top_p", 1.0)
  if not 0 < top_p <= 1:
    raise BadRequest(f"top_p must be in (0, 1], not {top_p}", "top_p")
  top_k = _number(body, "top_k", 0, int)
  if top_k == -1:  # vLLM's "disabled"
    top_k = 0
  if not 0 <= top_k <= vocab_size:
    raise BadRequest(f"top_k must be in [0, {vocab_size}] (0 or -1 disables it), not {top_k}", "top_k")
  n = _number(body, "n", 1, int)
  if not 1 <= n <= 128:
    raise BadRequest(f"n must be in [1, 128], not {n}", "n")
  logprobs = body.get("logprobs")
  if logprobs is not None:
    logprobs = _number(body, "logprobs", None, int)
    if not 0 <= logprobs <= decode.MAX_LOGPROBS:
      raise BadRequest(f"logprobs must be in [0, {decode.MAX_LOGPROBS}], not {logprobs}", "logprobs")
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):  # more than OpenAI's 4, as lm-eval sends
    raise BadRequest("stop must be a text or a list of non-empty texts", "stop")
  seed = body.get("seed")
  seed = int.from_bytes(uuid.uuid4().bytes[:4], "little") if seed is None else _number(body, "seed", 0, int)
  if not isinstance(body.get("echo", False), bool) or not isinstance(body.get("stream", False), bool):
    raise BadRequest("echo and stream must be true or false", "echo" if not isinstance(body.get("echo", False), bool)
                     else "stream")
  return Sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed % 2**32,
                  stop=tuple(stop), logprobs=logprobs, echo=body.get("echo", False)), n


def special_text(tokenizer, token_id: int | None) -> str | None:
  """The text of a special token (end-of-text, beginning-of-sequence); None for a tokenizer without it."""
  return None if token_id is None else tokenizer.decode([token_id])


def chat_prompt(body: dict, tokenizer) -> list[int]:
  """The tokens of `messages` as the tokenizer's chat template writes them, with the assistant's
  turn opened (transformers' `apply_chat_template(..., add_generation_prompt=True)`)."""
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
    raise BadRequest("messages must be a non-empty list of {role, content} objects with text content", "messages")
  try:
    text = _template(template).render(messages=messages, add_generation_prompt=True,
                                       bos_token=special_text(tokenizer, tokenizer.bos_id) or "",
                                       eos_token=special_text(tokenizer, tokenizer.eot_id) or "")
  except Exception as e:  # the template's own errors (raise_exception), or jinja2's
    raise BadRequest(f"the chat template refused the messages: {e}", "messages") from None
  return tokenizer.encode(text)


@functools.cache
def _template(source: str):
  import jinja2.sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  environment.globals["raise_exception"] = raise_exception
  return environment.from_string(source)


def check_length(prompt: list[int], max_tokens: int, block_size: int) -> None:
  if len(prompt) + max_tokens > block_size:
    raise BadRequest(f"this model's context is {block_size} tokens; the prompt has {len(prompt)} and max_tokens "
                     f"asks for {max_tokens} more", "prompt" if len(prompt) >= block_size else "max_tokens",
                     code="context_length_exceeded")


def logprobs_body(tokens: list[Token], tokenizer, offset: int = 0) -> dict:
  """OpenAI's legacy logprobs object for `tokens`, whose text starts at `offset` of the choice's."""
  text_offset = []
  for token in tokens:
    text_offset.append(offset)
    offset += len(token.text)
  return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
          "top_logprobs": [None if t.top is None else {tokenizer.decode([i]): lp for i, lp in t.top.items()}
                           for t in tokens],
          "text_offset": text_offset}


def completion(model: str, choices: list[dict], usage: dict | None = None, object_id: str | None = None,
               chat: bool = False, chunk: bool = False) -> dict:
  """A completion (or chat completion; a stream's chunk of one) holding `choices`."""
  kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
  body = {"id": object_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
          "created": int(time.time()), "model": model, "choices": choices}
  if usage is not None:
    body["usage"] = usage
  return body
