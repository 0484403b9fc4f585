"""Prepare a corpus into token files for training and evaluation, streaming, on every core.

    gptjax prepare                                     # built-in Shakespeare, characters
    gptjax prepare --input 'books/*.txt' --tokenizer gpt2 --out data/books
    gptjax prepare --input data.parquet --text-key content --tokenizer gpt2 --out data/web
    gptjax prepare --input 'shards/*.jsonl.zst' --tokenizer ~/models/SmolLM2-135M/tokenizer.json --out data/web
    gptjax prepare --input hf:~/datasets/my_corpus --tokenizer gpt2 --out data/my_corpus
    gptjax prepare --input tfds:my_corpus --tfds-data-dir ~/tensorflow_datasets --tokenizer gpt2 --out data/my_corpus

Writes OUT/train.bin and OUT/val.bin (flat token ids, uint16, or uint32 for vocabularies over
65536) and OUT/meta.json (tokenizer, counts, source, and a fingerprint of the tokens that training
checks on --resume). Documents end with the tokenizer's end-of-text. Validation is the source's own
split where it has one; otherwise whole documents chosen by a hash of their index (--val-fraction);
when none was chosen, the last document if it is at most twice that share, else (and for a
corpus of one document: one text file, the built-in one) the end of the tokens, as nanoGPT does.
Workers tokenize batches of documents in parallel and the main process writes their tokens in
order, to temporary files renamed when complete: memory stays bounded whatever the corpus size,
and an interrupted prepare leaves no meta.json.
"""

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from gptjax import sources
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

TASK_CHARS = 1 << 20  # text per worker task


def default_workers() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_val(document: int, val_fraction: float) -> bool:
  """Whether document number `document` is held out: a fixed hash of its index (SplitMix64).
  The first document always trains."""
  z = (document + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  return document > 0 and (z ^ (z >> 31)) / 2.0**64 < val_fraction


# ---- the workers: text in, tokens out ----
_worker = {}


def _start_worker(tokenizer_meta: dict, val_fraction: float | None, dtype: str) -> None:
  if multiprocessing.parent_process() is not None:  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  _worker.update(tok=tokenizer_lib.from_meta(tokenizer_meta), val_fraction=val_fraction, dtype=dtype)


def _encode(task: list[tuple[sources.Records, int]]) -> dict:
  """Tokens of a task's documents by split, with what the main process counts."""
  tok, val_fraction = _worker["tok"], _worker["val_fraction"]
  ids, lengths = {"train": [], "val": []}, {"train": 0, "val": 0}
  documents, text_bytes, last_train_start = {"train": 0, "val": 0}, 0, -1
  bos = np.asarray([tok.bos_id] if tok.bos_id is not None else [], np.int64)
  eot = np.asarray([tok.eot_id] if tok.eot_id is not None else [], np.int64)
  for records, first_document in task:
    for i, text in enumerate(records.texts()):
      first, last = records.piece or (True, True)
      document = first_document + i
      split = records.split if val_fraction is None else ("val" if is_val(document, val_fraction) else "train")
      if first and last and not text.strip():
        continue  # an empty document
      if first and split == "train":
        last_train_start = lengths["train"]
      parts = [bos] * first + [tok.encode_array(text)] + [eot] * last
      ids[split] += parts
      lengths[split] += sum(map(len, parts))
      documents[split] += int(first)
      text_bytes += len(text.encode("utf-8"))
  return {"ids": {split: np.concatenate(v or [bos[:0]], dtype=_worker["dtype"], casting="unsafe")
                  for split, v in ids.items()},
          "documents": documents, "bytes": text_bytes, "last_train_start": last_train_start,
          "reach": task[-1][0].reach}


def _tasks(source: sources.Source):
  """The source's records grouped into tasks of about TASK_CHARS, each with its first document's index."""
  task, size, document = [], 0, 0
  for records in source.read():
    task.append((records, document))
    document += records.documents
    size += records.chars
    if size >= TASK_CHARS:
      yield task
      task, size = [], 0
  if task:
    yield task


def _in_order(tasks, workers: int, init_args: tuple):
  """Encoded tasks, in order: in this process for one worker, else in `workers` processes with at
  most two tasks each under way (memory stays bounded however far the reader could run ahead)."""
  if workers == 1:
    _start_worker(*init_args)
    yield from map(_encode, tasks)
    return
  with multiprocessing.get_context("spawn").Pool(workers, _start_worker, init_args) as pool:
    pending = collections.deque()
    for task in tasks:
      pending.append(pool.apply_async(_encode, (task,)))
      if len(pending) >= 2 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


def _tokenizer(name: str, source: sources.Source) -> tokenizer_lib.Tokenizer:
  if name == "gpt2":
    return tokenizer_lib.GPT2Tokenizer()
  if name != "char":
    return tokenizer_lib.HFTokenizer.from_file(name)
  chars = set()  # the character vocabulary needs a first pass over the text
  for records in source.read():
    for text in records.texts():
      chars.update(text)
  return tokenizer_lib.CharTokenizer("".join(sorted(chars)))


class _Progress:
  """A bar on a terminal (documents, tokens, MB/s of text, ETA); elsewhere a line a minute."""

  def __init__(self, source: sources.Source, show: bool):
    self.start = self.last_line = time.monotonic()
    self.log_lines = show and not sys.stderr.isatty()
    self.bar = tqdm(total=source.total, unit=source.unit, unit_scale=True, dynamic_ncols=True,
                    disable=None if show else True, desc="prepare")

  def update(self, reach: int, documents: int, tokens: int, text_bytes: int) -> None:
    mb_per_s = text_bytes / 1e6 / max(time.monotonic() - self.start, 1e-9)
    self.bar.update(reach - self.bar.n)
    self.bar.set_postfix_str(f"{documents:,} docs, {tokens:,} tokens, {mb_per_s:.1f} MB/s of text", refresh=False)
    if self.log_lines and time.monotonic() - self.last_line >= 60:
      self.last_line = time.monotonic()
      print(f"prepare: {reach / max(self.bar.total, 1):.0%}, {documents:,} documents, {tokens:,} tokens, "
            f"{mb_per_s:.1f} MB/s", file=sys.stderr, flush=True)

  def close(self) -> None:
    self.bar.close()


def _move_tail(out: pathlib.Path, cut: int, itemsize: int) -> None:
  """Moves train tokens from `cut` on to the (empty) validation file."""
  with open(out / "train.bin.tmp", "r+b") as train, open(out / "val.bin.tmp", "wb") as val:
    train.seek(cut * itemsize)
    shutil.copyfileobj(train, val, 1 << 24)
    train.truncate(cut * itemsize)


def _hold_out(out: pathlib.Path, counts: dict, last_start: int, val_fraction: float, itemsize: int, name: str) -> str:
  """When no document went to validation: the last one does, unless it is more than twice the
  share asked for; then (and for a lone document) the end of the tokens."""
  n, docs = counts["tokens"]["train"], counts["documents"]["train"]
  whole = docs >= 2 and n - last_start <= 2 * val_fraction * n
  if whole:
    cut, how = last_start, "the last document"
  else:
    cut = n - int(n * val_fraction)
    how = f"the last {val_fraction:.0%} of the " + \
        ("tokens (too few documents to hold out whole ones)" if docs >= 2 else "only document's tokens")
    if n - cut < 2 or cut < 2:
      raise UserError(f"{name!r} has only {n} tokens: too few to split off validation")
  _move_tail(out, cut, itemsize)
  counts["tokens"] = {"train": cut, "val": n - cut}
  if whole:
    counts["documents"] = {"train": docs - 1, "val": 1}
  return how


def fingerprint(out: pathlib.Path, meta: dict, suffix: str = "") -> str:
  """A hash of the tokenizer, the counts and every token: equal exactly when the data is."""
  digest = hashlib.blake2b(digest_size=16)
  digest.update(json.dumps([meta["tokenizer"], meta["dtype"], meta["tokens"]], sort_keys=True).encode())
  for split in ("train", "val"):
    with open(out / f"{split}.bin{suffix}", "rb") as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


def prepare(source: str, tokenizer: str, out_dir: str, *, val_fraction: float = 0.1, text_key: str = "text",
            tfds_data_dir: str | None = None, workers: int = 1, overwrite: bool = False,
            progress: bool = False) -> dict:
  """Tokenizes `source` into `out_dir` and returns the written metadata."""
  out = pathlib.Path(out_dir)
  if (out / "meta.json").exists() and not overwrite:
    raise UserError(f"{out} already holds prepared data; pass --overwrite to replace it")
  if tokenizer not in ("char", "gpt2") and not pathlib.Path(tokenizer).is_file():
    raise UserError(f"unknown tokenizer {tokenizer!r}: choose char, gpt2 or a Hugging Face tokenizer.json file")
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"val_fraction={val_fraction} is not in (0, 1)")
  if workers < 1:
    raise UserError(f"--workers={workers}: at least 1")
  corpus = sources.open_source(source, text_key=text_key, tfds_data_dir=tfds_data_dir)
  tok = _tokenizer(tokenizer, corpus)
  created = not out.exists()
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {out}: {e.strerror}") from None
  try:
    meta = _write(corpus, tok, out, val_fraction, workers, progress)
  except BaseException:  # bad input found on the way: leave nothing behind (a kill -9 leaves only *.tmp)
    for split in ("train", "val"):
      (out / f"{split}.bin.tmp").unlink(missing_ok=True)
    if created:
      shutil.rmtree(out, ignore_errors=True)
    raise
  (out / "meta.json").unlink(missing_ok=True)  # from here until the new one is written, train refuses the folder
  for split in ("train", "val"):
    os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
  (out / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
  os.replace(out / "meta.json.tmp", out / "meta.json")
  return meta


def _write(corpus: sources.Source, tok: tokenizer_lib.Tokenizer, out: pathlib.Path, val_fraction: float,
           workers: int, progress: bool) -> dict:
  """Tokenizes `corpus` into OUT/{train,val}.bin.tmp; returns their metadata."""
  dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
  counts = {"tokens": {"train": 0, "val": 0}, "documents": {"train": 0, "val": 0}}
  text_bytes, last_start, largest, bar = 0, -1, 0, _Progress(corpus, progress)
  init_args = (tok.to_meta(), None if corpus.has_val else val_fraction, dtype.name)
  with open(out / "train.bin.tmp", "wb") as train, open(out / "val.bin.tmp", "wb") as val:
    files = {"train": train, "val": val}
    for encoded in _in_order(_tasks(corpus), workers, init_args):
      if encoded["last_train_start"] >= 0:
        last_start = counts["tokens"]["train"] + encoded["last_train_start"]
      for split, ids in encoded["ids"].items():
        files[split].write(ids.tobytes())
        largest = max(largest, int(ids.max(initial=0)))
        counts["tokens"][split] += len(ids)
        counts["documents"][split] += encoded["documents"][split]
      text_bytes += encoded["bytes"]
      bar.update(encoded["reach"], sum(counts["documents"].values()), sum(counts["tokens"].values()), text_bytes)
  bar.close()
  if not counts["tokens"]["train"]:
    raise UserError(f"{corpus.name!r} holds no text")
  held_out = "the source's validation split" if corpus.has_val else f"documents chosen by hash ({val_fraction:.0%})"
  if not counts["tokens"]["val"] and not corpus.has_val:
    held_out = _hold_out(out, counts, last_start, val_fraction, dtype.itemsize, corpus.name)
  meta = {"tokenizer": tok.to_meta(), "vocab_size": tok.vocab_size, "dtype": dtype.name, "source": corpus.name,
          **counts, "max_token_id": largest, "validation": held_out}
  meta["fingerprint"] = fingerprint(out, meta, ".tmp")
  return meta


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", default=sources.BUILTIN_SHAKESPEARE,
                      help=f"files, a folder or a glob (text, JSON lines, Parquet), hf:PATH_OR_NAME, tfds:NAME "
                           f"or {sources.BUILTIN_SHAKESPEARE}")
  parser.add_argument("--tokenizer", default="char",
                      help="char, gpt2, or a Hugging Face tokenizer.json (end-of-text: a config.json beside it)")
  parser.add_argument("--out", default="data/shakespeare_char", help="output folder (data.dir in configs)")
  parser.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of documents held out for validation (unless the source has a validation split)")
  parser.add_argument("--text-key", default="text",
                      help="the field or column holding the text (JSON, Parquet, hf:, tfds:)")
  parser.add_argument("--tfds-data-dir", default=None, help="where TFDS datasets are prepared")
  parser.add_argument("--workers", type=int, default=default_workers(),
                      help="tokenizing processes (default: every core)")
  parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  started = time.monotonic()
  meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, text_key=args.text_key,
                 tfds_data_dir=args.tfds_data_dir, workers=args.workers, overwrite=args.overwrite,
                 progress=not args.no_progress)
  tokens, documents = meta["tokens"], sum(meta["documents"].values())
  print(f"prepared {args.out}: {tokens['train']:,} train and {tokens['val']:,} val tokens from "
        f"{documents:,} document{'s' * (documents != 1)} (validation: {meta['validation']}), "
        f"{args.tokenizer} vocabulary of {meta['vocab_size']}, in {time.monotonic() - started:.1f} s")
