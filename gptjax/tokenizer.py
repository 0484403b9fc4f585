"""Tokenizers: character-level (vocabulary stored with the data), GPT-2 BPE through tiktoken, and
any Hugging Face tokenizer.json through the `tokenizers` library.

The GPT-2 BPE files ship inside the package (`assets/gpt2`), so nothing is downloaded.
A tokenizer is described by a small JSON-able dict (`to_meta`) saved beside prepared data and
checkpoints, and rebuilt from it with `from_meta`.
"""

import functools
import importlib.resources
import json
import pathlib

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from gptjax.errors import UserError

_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOT_ID = 50256
GPT2_ASSETS = importlib.resources.files("gptjax") / "assets" / "gpt2"  # encoder.json, vocab.bpe


class CharTokenizer:
  """One token per distinct character of the training text."""

  eot_id = bos_id = None

  def __init__(self, chars: str):
    self.chars = chars
    self._ids = {c: i for i, c in enumerate(chars)}

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      raise UserError(f"character {e.args[0]!r} is not in the character vocabulary of this model") from None

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int64)

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in ids)

  def to_meta(self) -> dict:
    return {"kind": "char", "chars": self.chars}


class GPT2Tokenizer:
  """GPT-2's byte-level BPE (50257 tokens, <|endoftext|> = 50256)."""

  eot_id = GPT2_EOT_ID
  bos_id = None
  vocab_size = 50257

  def __init__(self):
    self._encoding = _gpt2_encoding()

  def encode(self, text: str) -> list[int]:
    return self._encoding.encode_ordinary(text)

  def encode_array(self, text: str) -> np.ndarray:
    """`encode` as an array, made without a Python list of ints: no text is special."""
    return self._encoding.encode_to_numpy(text, disallowed_special=())

  def decode(self, ids) -> str:
    return self._encoding.decode(list(ids))

  def to_meta(self) -> dict:
    return {"kind": "gpt2"}


@functools.cache
def _gpt2_encoding() -> tiktoken.Encoding:
  ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
      str(GPT2_ASSETS / "vocab.bpe"), str(GPT2_ASSETS / "encoder.json"),
      vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256, encoder_json_hash=_GPT2_ENCODER_JSON_SHA256)
  return tiktoken.Encoding(
      "gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
      special_tokens={"<|endoftext|>": GPT2_EOT_ID}, explicit_n_vocab=50257)


class HFTokenizer:
  """A Hugging Face `tokenizer.json` through the `tokenizers` library, as transformers' fast
  tokenizers read it; the file's text travels in the meta. `encode` adds no special tokens. The
  model's config names its end-of-text (eos_token_id: ends generation and documents) and its
  beginning-of-sequence token (bos_token_id: starts each sequence, where the tokenizer's own
  template adds it, as Llama's does)."""

  def __init__(self, tokenizer_json: str, eot_id: int | None = None, bos_id: int | None = None,
               chat_template: str | None = None):
    import tokenizers
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library raises its own types for a malformed file
      raise UserError(f"not a Hugging Face tokenizer.json: {str(e).splitlines()[0]}") from None
    self._json, self.eot_id, self.chat_template = tokenizer_json, eot_id, chat_template
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    with_template = self._tokenizer.encode("a", add_special_tokens=True).ids
    self.bos_id = bos_id if bos_id is not None and with_template[:1] == [bos_id] else None

  @classmethod
  def from_file(cls, path: str) -> "HFTokenizer":
    """A tokenizer.json; its end-of-text is the eos_token_id of a config.json beside it, if any,
    and its chat template the chat_template of a tokenizer_config.json beside it, if any."""
    path = pathlib.Path(path)
    config, tokenizer_config = _json_beside(path, "config.json"), _json_beside(path, "tokenizer_config.json")
    try:
      text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read {path}: {e}") from None
    first = lambda ids: ids[0] if isinstance(ids, list) else ids  # noqa: E731 (some configs list several)
    template = tokenizer_config.get("chat_template")
    return cls(text, first(config.get("eos_token_id")), first(config.get("bos_token_id")),
               template if isinstance(template, str) else None)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int64)

  def decode(self, ids) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  def to_meta(self) -> dict:
    meta = {"kind": "hf", "tokenizer_json": self._json, "eot_id": self.eot_id, "bos_id": self.bos_id}
    return meta | ({"chat_template": self.chat_template} if self.chat_template else {})


def _json_beside(path: pathlib.Path, name: str) -> dict:
  """The JSON object in the file `name` beside `path`; {} if there is none."""
  if not (path.parent / name).is_file():
    return {}
  try:
    value = json.loads((path.parent / name).read_text(encoding="utf-8"))
  except ValueError:
    raise UserError(f"{path.parent / name} is not readable JSON") from None
  return value if isinstance(value, dict) else {}


Tokenizer = CharTokenizer | GPT2Tokenizer | HFTokenizer


def encode_sequence(tok: Tokenizer, text: str) -> list[int]:
  """`text` as the model reads the start of a sequence: after its BOS token, if it has one."""
  return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)


def from_meta(meta: dict) -> Tokenizer:
  if meta.get("kind") == "char":
    return CharTokenizer(meta["chars"])
  if meta.get("kind") == "gpt2":
    return GPT2Tokenizer()
  if meta.get("kind") == "hf":
    return HFTokenizer(meta["tokenizer_json"], meta.get("eot_id"), meta.get("bos_id"), meta.get("chat_template"))
  raise UserError(f"unknown tokenizer {meta.get('kind')!r}")
