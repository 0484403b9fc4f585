"""gptjax prepare: every source format, document-wise validation, parallel workers, safe output."""

import gzip
import hashlib
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptjax import data
from gptjax import prepare
from gptjax import sources
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

from conftest import user_env

# sha256 of train.bin and val.bin from the prepare before streaming (commit cf8ca2d), built-in corpus
BEFORE_STREAMING = {
    "char": ("cbd3655de3452a3865db2cc79d440e75a8d6a2efc19cf8c476686db8ee67660b",
             "80da735eaa485105c09c45d4a2f7f2b6a2971bb48f91c23d4bec1274df9577ac"),
    "gpt2": ("290ea158f0ed49d67f0e209fe4d63235052b3cff2cc36430889b44661ce16292",
             "db5052784042a518063725de35bf19676e57c1a9c633cf1a4c3b9df014905cb1"),
}


def _documents(n: int = 120) -> list[str]:
  """`n` documents of varied length cut from the built-in plays (one empty, to be skipped)."""
  text = sources.read_text(sources.BUILTIN_SHAKESPEARE)
  rng = np.random.default_rng(0)
  starts = rng.integers(0, len(text) - 5000, size=n)
  docs = [text[s:s + int(rng.integers(20, 4000))] for s in starts]
  docs[7] = ""
  return docs


def _expected(docs: list[str], val_fraction: float = 0.1) -> dict[str, list[int]]:
  tok = tokenizer_lib.GPT2Tokenizer()
  ids = {"train": [], "val": []}
  for i, doc in enumerate(docs):
    if doc:
      ids["val" if prepare.is_val(i, val_fraction) else "train"] += tok.encode(doc) + [tok.eot_id]
  return ids


def _write_format(docs: list[str], kind: str, where: pathlib.Path) -> str:
  """The documents as a source of `kind`; returns what --input takes."""
  where.mkdir()
  lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)).encode()
  if kind == "text":
    for i, doc in enumerate(docs):
      (where / f"doc{i:04d}.txt").write_text(doc)
    return str(where)
  if kind == "jsonl":
    (where / "a.jsonl").write_bytes(lines)
    return str(where / "a.jsonl")
  if kind == "jsonl.gz":
    (where / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    return str(where / "a.jsonl.gz")
  if kind == "jsonl.zst":
    import zstandard
    half = lines.index(b"\n", len(lines) // 2) + 1  # two shards, read in name order
    (where / "part0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[:half]))
    (where / "part1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[half:]))
    return str(where / "*.jsonl.zst")
  if kind == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), where / "a.parquet", row_group_size=50)
    return str(where / "a.parquet")
  if kind == "hf":
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(where / "ds"))
    return f"hf:{where / 'ds'}"
  if kind == "tfds":
    tfds = pytest.importorskip("tensorflow_datasets")

    class Documents(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                                     disable_shuffling=True)  # the documents in their order

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i, doc in enumerate(docs):
          yield i, {"text": doc}

    Documents(data_dir=str(where), file_format="array_record").download_and_prepare()
    return "tfds:documents"
  raise ValueError(kind)


@pytest.mark.parametrize("kind,workers", [("text", 1), ("jsonl", 2), ("jsonl.gz", 1), ("jsonl.zst", 1),
                                          ("parquet", 2), ("hf", 1), ("tfds", 1)])
def test_every_format_gives_the_same_tokens(tmp_path, monkeypatch, kind, workers):
  monkeypatch.setattr(prepare, "TASK_CHARS", 20_000)  # many tasks, so that order across workers matters
  monkeypatch.setattr(sources, "PIECE_CHARS", 30_000)
  docs = _documents()
  meta = prepare.prepare(_write_format(docs, kind, tmp_path / "in"), "gpt2", str(tmp_path / "out"), workers=workers,
                         tfds_data_dir=str(tmp_path / "in"))
  expected = _expected(docs)
  for split in ("train", "val"):
    assert data.load_tokens(str(tmp_path / "out"), split).tolist() == expected[split]
  assert meta["documents"] == {"train": sum(not prepare.is_val(i, 0.1) for i, d in enumerate(docs) if d),
                               "val": sum(prepare.is_val(i, 0.1) for i, d in enumerate(docs) if d)}
  assert meta["documents"]["val"] >= 5 and meta["validation"] == "documents chosen by hash (10%)"
  # the same tokens and tokenizer give the same fingerprint, whatever the format
  assert meta["fingerprint"] == prepare.fingerprint(tmp_path / "out", meta)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_the_built_in_corpus_prepares_as_before_streaming(tmp_path, tokenizer):
  meta = prepare.prepare(sources.BUILTIN_SHAKESPEARE, tokenizer, str(tmp_path / "out"), workers=2)
  for split, expected in zip(("train", "val"), BEFORE_STREAMING[tokenizer]):
    assert hashlib.sha256((tmp_path / "out" / f"{split}.bin").read_bytes()).hexdigest() == expected
  assert meta["validation"] == "the last 10% of the only document's tokens"


def test_a_large_text_file_in_pieces_encodes_as_a_whole(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "PIECE_CHARS", 997)
  monkeypatch.setattr(prepare, "TASK_CHARS", 3000)
  text = sources.read_text(sources.BUILTIN_SHAKESPEARE)[:200_000]
  (tmp_path / "big.txt").write_text(text)
  prepare.prepare(str(tmp_path / "big.txt"), "gpt2", str(tmp_path / "out"))
  tokens = np.concatenate([data.load_tokens(str(tmp_path / "out"), s) for s in ("train", "val")])
  tok = tokenizer_lib.GPT2Tokenizer()
  assert tokens.tolist() == tok.encode(text) + [tok.eot_id]


def test_validation_takes_whole_documents(tmp_path):
  docs = [f"Document {i}. " + "word " * (i % 17 + 3) for i in range(400)]
  prepare.prepare(_write_format(docs, "jsonl", tmp_path / "in"), "gpt2", str(tmp_path / "out"), val_fraction=0.25)
  tok = tokenizer_lib.GPT2Tokenizer()
  val = tok.decode(data.load_tokens(str(tmp_path / "out"), "val")).split("<|endoftext|>")[:-1]
  assert set(val) <= set(docs) and 0.2 < len(val) / len(docs) < 0.3
  # too few documents for the hash to choose any: the last one is held out, whole, if it is small enough
  few = [docs[0] * 5, docs[1] * 5, docs[2]]
  meta = prepare.prepare(_write_format(few, "text", tmp_path / "few"), "gpt2", str(tmp_path / "out2"))
  assert meta["validation"] == "the last document" and meta["documents"] == {"train": 2, "val": 1}
  assert tok.decode(data.load_tokens(str(tmp_path / "out2"), "val")) == few[2] + "<|endoftext|>"
  # ... and the end of the tokens if the last document is more than twice the share asked for
  meta = prepare.prepare(_write_format(few[:2], "text", tmp_path / "two"), "gpt2", str(tmp_path / "out3"))
  assert meta["validation"] == "the last 10% of the tokens (too few documents to hold out whole ones)"
  assert meta["tokens"]["val"] == int(0.1 * (meta["tokens"]["train"] + meta["tokens"]["val"]))


def test_the_source_validation_split_is_used(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one train doc", "two train docs"]}),
                        "validation": datasets.Dataset.from_dict({"text": ["held out"]})}).save_to_disk(str(tmp_path / "ds"))
  meta = prepare.prepare(f"hf:{tmp_path / 'ds'}", "gpt2", str(tmp_path / "out"))
  tok = tokenizer_lib.GPT2Tokenizer()
  assert tok.decode(data.load_tokens(str(tmp_path / "out"), "val")) == "held out<|endoftext|>"
  assert meta["documents"] == {"train": 2, "val": 1} and meta["validation"] == "the source's validation split"


def test_tfds_dataset_from_a_local_builder(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyPoems(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 20), "test": self._generate_examples(20, 25)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"text": f"Poem {i}: the quick brown fox jumps over the lazy dog."}

  TinyPoems(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  meta = prepare.prepare("tfds:tiny_poems", "gpt2", str(tmp_path / "out"), tfds_data_dir=str(tmp_path / "tfds"))
  tok = tokenizer_lib.GPT2Tokenizer()
  train_tokens = data.load_tokens(str(tmp_path / "out"), "train")
  val_tokens = data.load_tokens(str(tmp_path / "out"), "val")
  assert (train_tokens == tok.eot_id).sum() == 20 and (val_tokens == tok.eot_id).sum() == 5  # documents
  train_text = tok.decode(train_tokens)
  assert "Poem 3: the quick brown fox" in train_text and "Poem 21" not in train_text
  assert "Poem 21: the quick" in tok.decode(val_tokens)  # the test split became validation
  assert meta["source"] == "tfds:tiny_poems"
  with pytest.raises(UserError, match="no feature 'body'"):
    prepare.prepare("tfds:tiny_poems", "gpt2", str(tmp_path / "out2"), tfds_data_dir=str(tmp_path / "tfds"), text_key="body")


@pytest.mark.parametrize("kind", ["file", "folder", "glob"])
def test_prepare_reads_file_folder_or_glob(tmp_path, kind):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text("first file. " * 50)
  (tmp_path / "texts" / "b.txt").write_text("second file! " * 50)
  source = {"file": tmp_path / "texts" / "a.txt", "folder": tmp_path / "texts", "glob": tmp_path / "texts" / "*.txt"}[kind]
  meta = prepare.prepare(str(source), "gpt2", str(tmp_path / "out"))
  tokens = np.concatenate([data.load_tokens(str(tmp_path / "out"), s) for s in ("train", "val")])
  text = tokenizer_lib.GPT2Tokenizer().decode(tokens)
  assert text.startswith("first file.") and (("second file!" in text) == (kind != "file"))
  assert meta["tokens"]["val"] == pytest.approx(0.1 * len(tokens), abs=1)  # one or two documents: the end


def test_prepare_refuses_to_overwrite(tmp_path):
  (tmp_path / "a.txt").write_text("some text here " * 20)
  prepare.prepare(str(tmp_path / "a.txt"), "char", str(tmp_path / "out"))
  before = (tmp_path / "out" / "train.bin").read_bytes()
  (tmp_path / "b.txt").write_text("other words " * 20)
  with pytest.raises(UserError, match="already holds prepared data"):
    prepare.prepare(str(tmp_path / "b.txt"), "char", str(tmp_path / "out"))
  assert (tmp_path / "out" / "train.bin").read_bytes() == before
  prepare.prepare(str(tmp_path / "b.txt"), "char", str(tmp_path / "out"), overwrite=True)
  assert (tmp_path / "out" / "train.bin").read_bytes() != before


def test_a_killed_prepare_leaves_nothing_train_accepts_and_can_start_again(tmp_path):
  text = sources.read_text(sources.BUILTIN_SHAKESPEARE)
  (tmp_path / "in").mkdir()
  for i in range(12):
    (tmp_path / "in" / f"{i:02d}.txt").write_text(text)  # ~13 MB: seconds to tokenize
  command = [sys.executable, "-m", "gptjax.cli", "prepare", "--input", str(tmp_path / "in"), "--tokenizer", "gpt2",
             "--out", str(tmp_path / "out"), "--workers", "1"]
  process = subprocess.Popen(command, env=user_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  partial = tmp_path / "out" / "train.bin.tmp"
  while process.poll() is None and not (partial.exists() and partial.stat().st_size > 0):
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert partial.stat().st_size > 0 and not (tmp_path / "out" / "meta.json").exists()
  with pytest.raises(UserError, match="no prepared data"):
    data.load_prepared(data.config_lib.DataConfig(dir=str(tmp_path / "out")))
  finished = subprocess.run(command, env=user_env(), capture_output=True, text=True)  # no --overwrite needed
  assert finished.returncode == 0, finished.stderr
  assert "prepared" in finished.stdout and not partial.exists()
  meta = data.load_meta(str(tmp_path / "out"))
  assert meta["documents"]["train"] + meta["documents"]["val"] == 12


@pytest.mark.parametrize("name,content", [("bad.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 1000)[:40] + b"junk" * 50),
                                          ("bad.jsonl.zst", b"not zstd at all" * 10)])
def test_a_corrupt_compressed_file_is_a_one_line_error(tmp_path, name, content):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(UserError, match=f"cannot read {tmp_path / name}: "):
    prepare.prepare(str(tmp_path / name), "gpt2", str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_a_folder_leaves_out_hidden_files_and_folders(tmp_path):
  (tmp_path / "in" / ".git").mkdir(parents=True)
  (tmp_path / "in" / ".git" / "config").write_text("[core] not a play")
  (tmp_path / "in" / ".notes").write_text("private")
  (tmp_path / "in" / "play.txt").write_text("To be, or not to be. " * 20)
  prepare.prepare(str(tmp_path / "in"), "char", str(tmp_path / "out"))
  assert set(data.load_meta(str(tmp_path / "out"))["tokenizer"]["chars"]) == set("To be, or not to be. ")
