"""Data: prepare a corpus into token arrays once, then draw random training windows from them.

`prepare` reads text (a file, a folder, a glob, the built-in Shakespeare, or a TFDS dataset read
through `tfds.data_source`, which needs no TensorFlow), tokenizes it and writes

    DIR/train.bin, DIR/val.bin   flat token ids (uint16, or uint32 for vocabularies over 65536)
    DIR/meta.json                tokenizer, vocabulary size, dtype, token counts, source

`TokenBatches` draws random windows. Batch i depends only on (seed, i), so the iterator's state is
a step counter that the checkpoint stores: a resumed run continues the very same stream.
"""

import glob
import importlib.resources
import json
import os
import pathlib

import numpy as np

from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

BUILTIN_SHAKESPEARE = "builtin:shakespeare"
TFDS_PREFIX = "tfds:"


def _text_files(source: str) -> list[pathlib.Path]:
  path = pathlib.Path(source)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
  else:
    files = sorted(pathlib.Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
  if not files:
    raise UserError(f"no text found at {source!r}: not a file, a folder with files, or a matching glob")
  return files


def read_text(source: str) -> str:
  """The text of a file, of a folder's files or of a glob's matches (sorted by name, concatenated)."""
  if source == BUILTIN_SHAKESPEARE:
    return (importlib.resources.files("gptjax") / "assets" / "shakespeare.txt").read_text(encoding="utf-8")
  parts = []
  for path in _text_files(source):
    try:
      parts.append(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
      raise UserError(f"{path} is not UTF-8 text") from None
  return "".join(parts)


def _tfds_documents(name: str, data_dir: str | None, text_key: str) -> dict[str, list[str]]:
  """Each split of a TFDS dataset as a list of documents, read without TensorFlow."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError("TFDS input needs tensorflow-datasets: pip install 'gptjax[tfds]'") from None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    splits = list(builder.info.splits.keys())
  except Exception as e:  # tfds raises many types for a missing or unbuilt dataset
    raise UserError(f"cannot open TFDS dataset {name!r}: {str(e).splitlines()[0]}") from None
  if not splits:
    raise UserError(f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default data dir'}")
  documents = {}
  for split in splits:
    source = tfds.data_source(name, data_dir=data_dir, split=split)
    if len(source) and text_key not in source[0]:
      raise UserError(f"TFDS dataset {name!r} has no feature {text_key!r}; it has {sorted(source[0])}")
    documents[split] = [_as_str(source[i][text_key]) for i in range(len(source))]
  return documents


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _encode_documents(tok: tokenizer_lib.Tokenizer, documents: list[str]) -> np.ndarray:
  """Documents joined into one token stream, separated by end-of-text where the tokenizer has one."""
  ids = []
  for doc in documents:
    ids.extend(tokenizer_lib.encode_sequence(tok, doc))
    if tok.eot_id is not None:
      ids.append(tok.eot_id)
  return np.asarray(ids, dtype=np.int64)


def prepare(source: str, tokenizer: str, out_dir: str, *, val_fraction: float = 0.1,
            tfds_data_dir: str | None = None, text_key: str = "text", overwrite: bool = False) -> dict:
  """Tokenizes `source` into `out_dir` and returns the written metadata."""
  out = pathlib.Path(out_dir)
  if (out / "meta.json").exists() and not overwrite:
    raise UserError(f"{out} already holds prepared data; pass --overwrite to replace it")
  if tokenizer not in ("char", "gpt2") and not pathlib.Path(tokenizer).is_file():
    raise UserError(f"unknown tokenizer {tokenizer!r}: choose char, gpt2 or a Hugging Face tokenizer.json file")
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"val_fraction={val_fraction} is not in (0, 1)")

  if source.startswith(TFDS_PREFIX):
    documents = _tfds_documents(source[len(TFDS_PREFIX):], tfds_data_dir, text_key)
    train_docs = documents.get("train", [])
    val_docs = documents.get("validation", documents.get("test", []))
    all_text = "".join(train_docs + val_docs)
  else:
    all_text = read_text(source)
    train_docs, val_docs = [all_text], []
  if not all_text.strip():
    raise UserError(f"{source!r} holds no text")

  if tokenizer == "char":
    tok = tokenizer_lib.CharTokenizer.from_text(all_text)
  elif tokenizer == "gpt2":
    tok = tokenizer_lib.GPT2Tokenizer()
  else:
    tok = tokenizer_lib.HFTokenizer.from_file(tokenizer)
  train_ids = _encode_documents(tok, train_docs)
  if val_docs:
    val_ids = _encode_documents(tok, val_docs)
  else:  # hold out the end of the stream, as nanoGPT does
    n_val = int(len(train_ids) * val_fraction)
    if n_val < 2 or len(train_ids) - n_val < 2:
      raise UserError(f"{source!r} has only {len(train_ids)} tokens: too few to split off validation")
    train_ids, val_ids = train_ids[:-n_val], train_ids[-n_val:]

  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
  meta = {
      "tokenizer": tok.to_meta(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
      "source": source, "tokens": {"train": int(len(train_ids)), "val": int(len(val_ids))},
  }
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {out}: {e.strerror}") from None
  for split, ids in (("train", train_ids), ("val", val_ids)):  # write, then rename: never half-written
    ids.astype(dtype).tofile(out / f"{split}.bin.tmp")
    os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
  (out / "meta.json").write_text(json.dumps(meta, indent=1))
  return meta


def load_meta(data_dir: str) -> dict:
  path = pathlib.Path(data_dir) / "meta.json"
  if not path.is_file():
    raise UserError(f"no prepared data in {data_dir}: run `gptjax prepare --out {data_dir}` first")
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, OSError) as e:
    raise UserError(f"{path} is not readable JSON ({e}): prepare the data again") from None
  missing = [key for key in ("vocab_size", "dtype", "tokenizer") if not isinstance(meta, dict) or key not in meta]
  if missing:
    raise UserError(f"{path} lacks {', '.join(map(repr, missing))}: prepare the data again")
  if meta["dtype"] not in ("uint16", "uint32"):
    raise UserError(f"{path} names dtype {meta['dtype']!r}, not uint16 or uint32: prepare the data again")
  return meta


def load_tokens(data_dir: str, split: str) -> np.ndarray:
  """One split's token ids as a read-only memory map."""
  meta = load_meta(data_dir)
  path = pathlib.Path(data_dir) / f"{split}.bin"
  if not path.is_file() or path.stat().st_size == 0:
    raise UserError(f"{path} is missing or empty: prepare the data again")
  if path.stat().st_size % np.dtype(meta["dtype"]).itemsize:
    raise UserError(f"{path} is not a whole number of {meta['dtype']} tokens (cut short?): prepare the data again")
  tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
  largest = int(tokens.max())  # one pass over the file; an id off the embedding table would train on garbage
  if largest >= meta["vocab_size"]:
    raise UserError(f"{path} holds token id {largest}, not below the vocabulary size {meta['vocab_size']} "
                    "of its meta.json: prepare the data again")
  return tokens


class TokenBatches:
  """Random windows of `block_size + 1` tokens, as (inputs, targets) of shape [accum, batch, block].

  `batch_size` counts sequences over all processes; each process materialises only its own rows.
  """

  def __init__(self, tokens: np.ndarray, *, batch_size: int, block_size: int, accum_steps: int = 1,
               seed: int = 0, step: int = 0, process_index: int = 0, process_count: int = 1, name: str = "data"):
    if len(tokens) < block_size + 1:
      raise UserError(f"the {name} split has {len(tokens)} tokens, fewer than one block of "
                      f"{block_size} + 1: use more text or a smaller model.block_size")
    if batch_size % process_count:
      raise UserError(f"batch size {batch_size} is not divisible by {process_count} processes")
    self.tokens, self.block_size, self.seed, self.step = tokens, block_size, seed, step
    self.shape = (accum_steps, batch_size)
    local = batch_size // process_count
    self.rows = slice(process_index * local, (process_index + 1) * local)

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng((self.seed, step))
    starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.shape)[:, self.rows]
    windows = self.tokens[starts[..., None] + np.arange(self.block_size + 1)].astype(np.int32)
    return windows[..., :-1], windows[..., 1:]  # [accum, local_batch, block] each

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.batch(self.step)
    self.step += 1
    return batch

  def state(self) -> dict:
    return {"seed": self.seed, "step": self.step}

  def restore(self, state: dict) -> None:
    self.seed, self.step = state["seed"], state["step"]
