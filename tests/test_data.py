import json

import numpy as np
import pytest

from gptjax import data
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError


def test_builtin_corpus_is_tiny_shakespeare_sized(char_data):
  meta = json.loads((char_data / "meta.json").read_text())
  assert meta["tokens"]["train"] + meta["tokens"]["val"] == 1_115_394
  assert meta["vocab_size"] == 77 and meta["dtype"] == "uint16"
  tok = tokenizer_lib.from_meta(meta["tokenizer"])
  val = data.load_tokens(str(char_data), "val")
  assert tok.decode(val[:0]) == "" and len(val) == 111_539
  assert tok.decode(tok.encode("ROMEO: hello")) == "ROMEO: hello"


def test_gpt2_tokenizer_offline():
  tok = tokenizer_lib.GPT2Tokenizer()
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.decode(tok.encode("Thou art more lovely, 1609!")) == "Thou art more lovely, 1609!"


@pytest.mark.parametrize("kind", ["file", "folder", "glob"])
def test_prepare_reads_file_folder_or_glob(tmp_path, kind):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text("first file. " * 50)
  (tmp_path / "texts" / "b.txt").write_text("second file! " * 50)
  source = {"file": tmp_path / "texts" / "a.txt", "folder": tmp_path / "texts", "glob": tmp_path / "texts" / "*.txt"}[kind]
  meta = data.prepare(str(source), "gpt2", str(tmp_path / "out"))
  tokens = np.concatenate([data.load_tokens(str(tmp_path / "out"), s) for s in ("train", "val")])
  text = tokenizer_lib.GPT2Tokenizer().decode(tokens)
  assert text.startswith("first file.") and (("second file!" in text) == (kind != "file"))
  assert meta["tokens"]["val"] == pytest.approx(0.1 * len(tokens), abs=1)


def test_prepare_refuses_to_overwrite(tmp_path):
  (tmp_path / "a.txt").write_text("some text here " * 20)
  data.prepare(str(tmp_path / "a.txt"), "char", str(tmp_path / "out"))
  before = (tmp_path / "out" / "train.bin").read_bytes()
  (tmp_path / "b.txt").write_text("other words " * 20)
  with pytest.raises(UserError, match="already holds prepared data"):
    data.prepare(str(tmp_path / "b.txt"), "char", str(tmp_path / "out"))
  assert (tmp_path / "out" / "train.bin").read_bytes() == before
  data.prepare(str(tmp_path / "b.txt"), "char", str(tmp_path / "out"), overwrite=True)
  assert (tmp_path / "out" / "train.bin").read_bytes() != before


def test_batches_are_shifted_windows_and_resume_the_same_stream():
  tokens = np.arange(1000, dtype=np.uint16)
  batches = data.TokenBatches(tokens, batch_size=4, block_size=8, accum_steps=2, seed=3)
  first = [next(batches) for _ in range(5)]
  x, y = first[0]
  assert x.shape == y.shape == (2, 4, 8) and x.dtype == np.int32
  np.testing.assert_array_equal(y, x + 1)  # targets are the inputs shifted by one token
  np.testing.assert_array_equal(np.diff(x, axis=-1), 1)  # contiguous windows
  state = batches.state()
  later = [next(batches) for _ in range(3)]
  resumed = data.TokenBatches(tokens, batch_size=4, block_size=8, accum_steps=2, seed=0)
  resumed.restore(state)
  for (a, b), (c, d) in zip(later, [next(resumed) for _ in range(3)]):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)


def test_each_process_gets_its_own_rows_of_the_global_batch():
  tokens = np.arange(5000, dtype=np.uint16)
  whole = data.TokenBatches(tokens, batch_size=8, block_size=16, seed=1).batch(7)[0]
  parts = [data.TokenBatches(tokens, batch_size=8, block_size=16, seed=1, process_index=i, process_count=4).batch(7)[0]
           for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_text_shorter_than_one_block_is_an_error():
  with pytest.raises(UserError, match="fewer than one block"):
    data.TokenBatches(np.arange(10, dtype=np.uint16), batch_size=2, block_size=10)


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
  meta = data.prepare("tfds:tiny_poems", "gpt2", str(tmp_path / "out"), tfds_data_dir=str(tmp_path / "tfds"))
  tok = tokenizer_lib.GPT2Tokenizer()
  train_tokens = data.load_tokens(str(tmp_path / "out"), "train")
  val_tokens = data.load_tokens(str(tmp_path / "out"), "val")
  assert (train_tokens == tok.eot_id).sum() == 20 and (val_tokens == tok.eot_id).sum() == 5  # documents
  train_text = tok.decode(train_tokens)
  assert "Poem 3: the quick brown fox" in train_text and "Poem 21" not in train_text
  assert "Poem 21: the quick" in tok.decode(val_tokens)  # the test split became validation
  assert meta["source"] == "tfds:tiny_poems"
  with pytest.raises(UserError, match="no feature 'body'"):
    data.prepare("tfds:tiny_poems", "gpt2", str(tmp_path / "out2"), tfds_data_dir=str(tmp_path / "tfds"), text_key="body")
