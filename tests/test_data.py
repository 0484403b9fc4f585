import ctypes
import json
import mmap
import os
import resource

import numpy as np
import pytest

from gptjax import config as config_lib
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


def test_a_mixture_draws_each_source_by_its_weight_deterministically():
  sources = [np.arange(0, 5000, dtype=np.uint16), np.arange(10000, 12000, dtype=np.uint16)]  # told apart by value
  kwargs = dict(batch_size=16, block_size=8, accum_steps=2, seed=5, weights=(0.7, 0.3))
  batches = data.TokenBatches(sources, **kwargs)
  firsts = np.concatenate([batches.batch(step)[0][..., 0].ravel() for step in range(400)])  # 12,800 sequences
  share = np.mean(firsts >= 10000)
  assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(firsts))  # within sampling error
  x, y = batches.batch(17)
  np.testing.assert_array_equal(np.diff(x, axis=-1), 1)  # each window from one source, contiguous
  np.testing.assert_array_equal(y, x + 1)
  again = data.TokenBatches(sources, **kwargs).batch(17)[0]
  np.testing.assert_array_equal(again, x)  # a function of (seed, step) alone
  parts = [data.TokenBatches(sources, **kwargs, process_index=i, process_count=2).batch(17)[0] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), x)


def test_resuming_on_other_data_is_refused_unless_allowed():
  tokens = np.arange(1000, dtype=np.uint16)
  state = data.TokenBatches(tokens, batch_size=2, block_size=8, fingerprint="aaaa").state()
  other = data.TokenBatches(tokens, batch_size=2, block_size=8, fingerprint="bbbb")
  with pytest.raises(UserError, match="is not the data this run was trained on"):
    other.restore(state, data_dir="data/x")
  other.restore(state, allow_change=True)
  assert other.step == state["step"]
  data.TokenBatches(tokens, batch_size=2, block_size=8, fingerprint="aaaa").restore(state)


def test_load_prepared_mixes_folders_of_one_tokenizer(tmp_path):
  from gptjax import config as config_lib
  from gptjax import prepare
  for name, text in (("a", "abc " * 300), ("b", "cab bca " * 300), ("c", "xyz " * 300)):
    (tmp_path / f"{name}.txt").write_text(text)
  for name in "abc":
    prepare.prepare(str(tmp_path / f"{name}.txt"), "gpt2", str(tmp_path / name))
  mixed = data.load_prepared(config_lib.DataConfig(mixture=f"{tmp_path / 'a'}:3,{tmp_path / 'b'}:1"))
  assert mixed.weights == (0.75, 0.25) and len(mixed.splits["train"]) == 2
  single = data.load_prepared(config_lib.DataConfig(dir=str(tmp_path / "a")))
  assert single.fingerprint == data.load_meta(str(tmp_path / "a"))["fingerprint"] != mixed.fingerprint
  prepare.prepare(str(tmp_path / "c.txt"), "char", str(tmp_path / "c_char"))
  with pytest.raises(UserError, match="prepared with another tokenizer"):
    data.load_prepared(config_lib.DataConfig(mixture=f"{tmp_path / 'a'}:1,{tmp_path / 'c_char'}:1"))


def _copy_prepared(src, dst):
  dst.mkdir()
  for name in ("meta.json", "train.bin", "val.bin"):
    (dst / name).write_bytes((src / name).read_bytes())
  return dst


def _resident_share(path) -> float:
  """The share of `path`'s pages in the page cache (mincore), from 0 to 1."""
  libc, page, size = ctypes.CDLL(None, use_errno=True), resource.getpagesize(), path.stat().st_size
  pages = (ctypes.c_ubyte * -(-size // page))()
  with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mapped:
    start = ctypes.c_char.from_buffer(mapped)
    assert libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), pages) == 0, ctypes.get_errno()
    del start  # the mapping closes only without pointers into it
  return sum(p & 1 for p in pages) / len(pages)


def _evicted(path):
  with open(path, "r+b") as f:
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
  assert _resident_share(path) < 0.05
  return path


def test_the_token_range_is_prepares_record_and_starting_does_not_read_the_files(char_data, tmp_path):
  """meta.json holds the largest id; a start reads it, not the token files: loading a folder with
  a 64 MiB train split and drawing a batch brings a few of its pages into memory, where a pass
  over the file (what the range check was) brings them all."""
  meta = json.loads((char_data / "meta.json").read_text())
  assert meta["max_token_id"] == int(np.fromfile(char_data / "train.bin", np.uint16).max()) == 76
  folder = _copy_prepared(char_data, tmp_path / "big")
  tokens = np.resize(np.fromfile(char_data / "train.bin", np.uint16), 32 * 2**20)
  tokens.tofile(folder / "train.bin")
  (folder / "meta.json").write_text(json.dumps({**meta, "tokens": {**meta["tokens"], "train": len(tokens)}}))

  _evicted(folder / "train.bin")
  prepared = data.load_prepared(config_lib.DataConfig(dir=str(folder)))
  data.TokenBatches(prepared.splits["train"], batch_size=8, block_size=64, vocab_size=77).batch(0)
  assert _resident_share(folder / "train.bin") < 0.1
  _evicted(folder / "train.bin")
  assert prepared.splits["train"][0].max() == 76 and _resident_share(folder / "train.bin") > 0.9  # a full pass


def test_a_folder_prepared_before_the_range_was_recorded_is_checked_per_batch(char_data, tmp_path):
  folder = _copy_prepared(char_data, tmp_path / "old")
  meta = json.loads((folder / "meta.json").read_text())
  del meta["max_token_id"]
  (folder / "meta.json").write_text(json.dumps(meta))
  train = data.load_prepared(config_lib.DataConfig(dir=str(folder))).splits["train"]
  batches = data.TokenBatches(train, batch_size=8, block_size=64, vocab_size=77)
  assert batches.batch(0)[0].max() < 77  # it still trains
  tokens = np.memmap(folder / "train.bin", np.uint16, mode="r+")
  tokens[:] = 80  # then written over
  tokens.flush()
  with pytest.raises(UserError, match="batch 3 of the data split holds token id 80, not below the vocabulary size 77"):
    batches.batch(3)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 65537])
def test_permute_is_a_permutation_chosen_by_seed_and_epoch(n):
  indices = np.arange(n)
  image = data.permute(indices, n, seed=3, epoch=0)
  np.testing.assert_array_equal(np.sort(image), indices)
  np.testing.assert_array_equal(data.permute(indices[::-1], n, 3, 0), image[::-1])  # pointwise: any order of asking
  if n >= 64:
    for other in (data.permute(indices, n, 4, 0), data.permute(indices, n, 3, 1)):
      assert (other != image).mean() > 0.9


@pytest.mark.parametrize("process_count", [1, 2])
def test_shuffled_order_takes_every_window_once_per_epoch_split_across_processes(process_count):
  """200 windows of 8 tokens (1601 tokens), batches of 2 x 5: an epoch is 20 steps. Each window
  starts at a multiple of 8 and appears once per epoch; the next epoch is another permutation;
  processes see disjoint rows of the same global order."""
  tokens = np.arange(1601, dtype=np.uint16)
  kwargs = dict(batch_size=10, block_size=8, accum_steps=2, seed=5, order="shuffled")
  parts = [data.TokenBatches(tokens, **kwargs, process_index=i, process_count=process_count) for i in range(process_count)]
  assert parts[0].windows_per_epoch == 200 and parts[0].epoch(20) == 2.0
  starts = lambda step: np.concatenate([p.batch(step)[0][..., 0] for p in parts], axis=1).ravel()  # noqa: E731
  first, second = (np.concatenate([starts(s) for s in range(e * 10, e * 10 + 10)]) for e in (0, 1))
  for epoch in (first, second):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(200) * 8)
  assert (first != second).mean() > 0.9
  x, y = parts[0].batch(3)
  np.testing.assert_array_equal(y, x + 1)
  whole = data.TokenBatches(tokens, **kwargs).batch(13)[0]
  np.testing.assert_array_equal(np.concatenate([p.batch(13)[0] for p in parts], axis=1), whole)
  again = data.TokenBatches(tokens, **kwargs)
  again.restore({"seed": 5, "step": 13, "fingerprint": None})
  np.testing.assert_array_equal(next(again)[0], whole)  # a function of (seed, step) alone: resumes exactly


def test_a_config_saved_before_data_order_reads_as_random_and_new_ones_shuffle_one_folder():
  saved = config_lib.to_dict(config_lib.load_config("shakespeare_char_cpu"))
  del saved["data"]["order"]
  assert config_lib.from_dict(saved).data.window_order == "random"
  assert config_lib.load_config("shakespeare_char_cpu").data.window_order == "shuffled"
  assert config_lib.load_config(None, ["data.mixture=a:1,b:1"]).data.window_order == "random"


@pytest.mark.parametrize("order", ["shuffled", "random"])
def test_aligned_windows_start_at_the_first_document_start_in_their_block(order):
  """Documents opened by token 0 every 5 to 40 tokens, with one 100 long (and a last one longer
  than a window: no window moves past the end): every window that holds a start in its first 16
  tokens begins with it; one inside the long document does not move."""
  rng = np.random.default_rng(0)
  lengths = [*rng.integers(5, 40, size=60), 100, *rng.integers(5, 40, size=60), 20]
  tokens = np.concatenate([np.concatenate([[0], rng.integers(1, 50, size=n - 1)]) for n in lengths]).astype(np.uint16)
  kwargs = dict(batch_size=32, block_size=16, seed=2, order=order)
  plain, aligned = (data.TokenBatches(tokens, **kwargs, align_to=a) for a in (None, 0))
  moved = 0
  for step in range(20):
    (before,), (after,) = plain.batch(step)[0], aligned.batch(step)[0]
    for was, now in zip(before, after):
      if 0 in was:
        assert now[0] == 0
        moved += was[0] != 0
      else:
        np.testing.assert_array_equal(now, was)  # no start in its block: the window stays
  assert moved > 100
  long_start = sum(lengths[:60])
  starts = np.arange(long_start + 1, long_start + 100 - 16)
  np.testing.assert_array_equal(aligned._aligned(tokens, starts), starts)
