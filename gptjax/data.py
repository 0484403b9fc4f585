"""Data: the token files that `gptjax prepare` wrote, and the training windows taken from them.

    DIR/train.bin, DIR/val.bin   flat token ids (uint16, or uint32 for vocabularies over 65536)
    DIR/meta.json                tokenizer, vocabulary size, dtype, counts, largest token id, source, fingerprint

A run reads one such folder (data.dir) or a weighted mixture of several (data.mixture).
`TokenBatches` makes the windows in one of two orders (data.order): `shuffled` walks the corpus as
epochs of non-overlapping windows, each epoch in its own permutation (a function of seed and
epoch, computed for the indices asked and never held: `permute`); `random` draws windows at
random places, with replacement (nanoGPT's way, and a mixture's); with data.align=document a window
moves forward to the first document start in its first block. Either way batch i depends only
on (seed, i), so the iterator's state is a step counter that the checkpoint stores, with the
data's fingerprint: a resumed run continues the very same stream, and refuses other data.
"""

import dataclasses
import hashlib
import json
import mmap
import pathlib

import numpy as np

from gptjax import config as config_lib
from gptjax.errors import UserError


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
  """One split's token ids, a read-only memory map of the file."""
  meta = load_meta(data_dir)
  path = pathlib.Path(data_dir) / f"{split}.bin"
  if not path.is_file() or path.stat().st_size == 0:
    raise UserError(f"{path} is missing or empty: prepare the data again")
  if path.stat().st_size % np.dtype(meta["dtype"]).itemsize:
    raise UserError(f"{path} is not a whole number of {meta['dtype']} tokens (cut short?): prepare the data again")
  with open(path, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if hasattr(mmap, "MADV_RANDOM"):  # windows at random places: no megabytes of read-ahead around each
    mapped.madvise(mmap.MADV_RANDOM)
  tokens = np.frombuffer(mapped, dtype=meta["dtype"])
  expected = meta.get("tokens", {}).get(split)
  if expected is not None and len(tokens) != expected:
    raise UserError(f"{path} holds {len(tokens):,} tokens, its meta.json says {expected:,}: prepare the data again")
  # An id off the embedding table would train on garbage. The range is prepare's record (never a pass
  # over the files: hundreds of GB per host); every batch is checked too (`TokenBatches`), which is
  # all a folder prepared before the record gets.
  largest = meta.get("max_token_id")
  if largest is not None and largest >= meta["vocab_size"]:
    raise UserError(f"{data_dir}/meta.json says its tokens reach id {largest}, not below its vocabulary size "
                    f"{meta['vocab_size']}: prepare the data again")
  return tokens


def opening_token(tokenizer) -> int | None:
  """The token that opens each document: the tokenizer's beginning-of-sequence token, else its
  end-of-text (written between documents); None where it has neither (characters)."""
  return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id


def align_token(cfg: config_lib.DataConfig, tokenizer) -> int | None:
  """The token windows start at (data.align=document), or None (windows start anywhere)."""
  if cfg.align == "none":
    return None
  if (start := opening_token(tokenizer)) is None:
    raise UserError("data.align=document needs a tokenizer that marks documents (end-of-text or "
                    "beginning-of-sequence); this data's marks none")
  return start


def document_start(cfg: config_lib.DataConfig, tokenizer) -> int | None:
  """The token that opens each document, for document masking (data.document_mask); None: no
  masking."""
  start = opening_token(tokenizer)
  setting = str(cfg.document_mask).lower()
  if setting == "true" and start is None:
    raise UserError("data.document_mask=true needs a tokenizer that marks documents (end-of-text or "
                    "beginning-of-sequence); this data's marks none: set data.document_mask=auto or false")
  if setting == "false" or start is None:
    if cfg.document_positions:
      raise UserError("data.document_positions=true needs the document mask (data.document_mask, and a tokenizer that marks documents)")
    return None
  return start


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """SplitMix64's finaliser of x ^ key (uint64, wrapping): every input bit reaches every output bit."""
  z = x ^ key
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def permute(indices: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """Where `indices` (in [0, n)) go in a pseudo-random permutation of [0, n) chosen by (seed,
  epoch), in constant memory: a 4-round Feistel network over the smallest even number of bits
  that holds n, re-applied to any value that lands at or past n (cycle walking)."""
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  low = np.uint64((1 << half) - 1)
  keys = np.random.default_rng((seed, epoch, 0x5EED)).integers(0, 2**63, size=4, dtype=np.uint64)
  x = np.asarray(indices, np.uint64).copy()
  outside = np.ones(x.shape, bool)
  while outside.any():
    left, right = x[outside] >> np.uint64(half), x[outside] & low
    for key in keys:
      left, right = right, left ^ (_mix(right, key) & low)
    x[outside] = (left << np.uint64(half)) | right
    outside = x >= n
  return x.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """The data a run reads: one prepared folder, or a weighted mixture of several with one tokenizer."""

  meta: dict  # the (first) folder's: tokenizer and vocabulary
  splits: dict[str, list[np.ndarray]]  # "train" and "val": one token array per folder
  weights: tuple[float, ...]
  fingerprint: str | None
  eval_sets: dict[str, np.ndarray]  # more validation sets by name: data.eval_sets, a mixture's folders


def load_prepared(cfg: config_lib.DataConfig) -> Prepared:
  folders = cfg.mixture_weights or {cfg.dir: 1.0}
  named = cfg.eval_set_dirs or {}
  metas = {folder: load_meta(folder) for folder in [*folders, *named.values()]}
  first, meta = next(iter(metas.items()))
  for folder, other in metas.items():
    if other["tokenizer"] != meta["tokenizer"]:
      setting = "data.mixture" if folder in folders else "data.eval_sets"
      raise UserError(f"{setting}: {folder} was prepared with another tokenizer than {first}")
  splits = {split: [load_tokens(folder, split) for folder in folders] for split in ("train", "val")}
  eval_sets = {_component_name(folder, list(folders)): tokens for folder, tokens in zip(folders, splits["val"])} \
      if len(folders) > 1 else {}
  eval_sets |= {name: load_tokens(folder, "val") for name, folder in named.items()}
  weights = tuple(w / sum(folders.values()) for w in folders.values())
  fingerprints = [other.get("fingerprint") for other in metas.values()]
  if len(folders) == 1 or None in fingerprints:
    fingerprint = fingerprints[0] if len(folders) == 1 else None
  else:
    fingerprint = hashlib.blake2b(json.dumps([fingerprints, weights]).encode(), digest_size=16).hexdigest()
  return Prepared(meta, splits, weights, fingerprint, eval_sets)


def _component_name(folder: str, folders: list[str]) -> str:
  """A mixture folder's name in reports: its last path part, or its place where two share one."""
  names = [pathlib.Path(f).name for f in folders]
  name = pathlib.Path(folder).name
  return name if names.count(name) == 1 else f"mixture_{folders.index(folder)}"


class TokenBatches:
  """Windows of `block_size + 1` tokens, as (inputs, targets) of shape [accum, batch, block].

  `tokens` is one token array, or several with `weights`: each sequence comes from one of them,
  drawn with those weights. `batch_size` counts sequences over all processes; each process
  materialises only its own rows. `order`: shuffled (epochs of the windows that start every
  `block_size` tokens, each window once per epoch; one array only) or random. `align_to`: a token
  id; a window moves forward to the first of these in its first `block_size` tokens, if any.
  """

  def __init__(self, tokens: np.ndarray | list[np.ndarray], *, batch_size: int, block_size: int,
               accum_steps: int = 1, seed: int = 0, step: int = 0, process_index: int = 0, process_count: int = 1,
               weights: tuple[float, ...] = (1.0,), fingerprint: str | None = None, name: str = "data",
               vocab_size: int | None = None, order: str = "random", align_to: int | None = None):
    self.sources = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    for source in self.sources:
      if len(source) < block_size + 1:
        raise UserError(f"the {name} split has {len(source)} tokens, fewer than one block of "
                        f"{block_size} + 1: use more text or a smaller model.block_size")
    if batch_size % process_count:
      raise UserError(f"batch size {batch_size} is not divisible by {process_count} processes")
    self.block_size, self.seed, self.step, self.name, self.vocab_size = block_size, seed, step, name, vocab_size
    self.weights, self.fingerprint = np.asarray(weights, np.float64), fingerprint
    self.shape = (accum_steps, batch_size)
    local = batch_size // process_count
    self.rows = slice(process_index * local, (process_index + 1) * local)
    if order == "shuffled" and len(self.sources) > 1:
      raise UserError("data.order=shuffled walks one folder; a data.mixture draws at random (data.order=random)")
    self.order, self.align_to = order, align_to
    self.windows_per_epoch = (len(self.sources[0]) - 1) // block_size  # shuffled: starts 0, T, 2T, ...

  def epoch(self, step: int) -> float:
    """How many epochs of windows the batches before `step` took (shuffled order)."""
    return step * self.shape[0] * self.shape[1] / self.windows_per_epoch

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.arange(self.block_size + 1)
    if self.order == "shuffled":
      first = step * self.shape[0] * self.shape[1]  # the step's sequences are numbers first, first + 1, ...
      numbers = (first + np.arange(self.shape[0] * self.shape[1])).reshape(self.shape)[:, self.rows]
      epochs, places = np.divmod(numbers, self.windows_per_epoch)
      windows_index = np.empty_like(numbers)
      for epoch in np.unique(epochs):  # a step spans at most two epochs (or more, on a tiny corpus)
        windows_index[epochs == epoch] = permute(places[epochs == epoch], self.windows_per_epoch, self.seed, int(epoch))
      tokens = self.sources[0]
      windows = tokens[self._aligned(tokens, windows_index * self.block_size)[..., None] + offsets]
      return self._checked(windows, step)
    rng = np.random.default_rng((self.seed, step))
    if len(self.sources) == 1:  # the draw of a single folder is unchanged: older runs resume exactly
      tokens = self.sources[0]
      starts = rng.integers(0, len(tokens) - self.block_size, size=self.shape)[:, self.rows]
      windows = tokens[self._aligned(tokens, starts)[..., None] + offsets]
    else:  # a source per sequence, then a place in it
      which = rng.choice(len(self.sources), size=self.shape, p=self.weights)[:, self.rows]
      place = rng.random(self.shape)[:, self.rows]
      windows = np.empty(which.shape + offsets.shape, np.int64)
      for k, tokens in enumerate(self.sources):
        starts = (place[which == k] * (len(tokens) - self.block_size)).astype(np.int64)
        windows[which == k] = tokens[self._aligned(tokens, starts)[:, None] + offsets]
    return self._checked(windows, step)

  def _aligned(self, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """`starts` moved forward to the first `align_to` token in the block after each (unmoved where
    there is none, or where the moved window would run past the end)."""
    if self.align_to is None:
      return starts
    block = tokens[np.minimum(starts[..., None] + np.arange(self.block_size), len(tokens) - 1)]
    opens = block == self.align_to
    moved = starts + np.where(opens.any(axis=-1), opens.argmax(axis=-1), 0)
    return np.where(moved <= len(tokens) - self.block_size - 1, moved, starts)

  def _checked(self, windows: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    if self.vocab_size is not None and windows.size and (largest := int(windows.max())) >= self.vocab_size:
      raise UserError(f"batch {step} of the {self.name} split holds token id {largest}, not below the vocabulary "
                      f"size {self.vocab_size}: the token files are not what meta.json describes; prepare the data again")
    windows = windows.astype(np.int32)
    return windows[..., :-1], windows[..., 1:]  # [accum, local_batch, block] each

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.batch(self.step)
    self.step += 1
    return batch

  def state(self) -> dict:
    return {"seed": self.seed, "step": self.step, "fingerprint": self.fingerprint}

  def restore(self, state: dict, *, data_dir: str = "the data", allow_change: bool = False) -> None:
    """Continues the stream of `state`, refusing data other than what it was drawn from."""
    saved = state.get("fingerprint")  # None: saved before fingerprints, or data prepared before them
    if saved and saved != self.fingerprint and not allow_change:
      raise UserError(f"{data_dir} is not the data this run was trained on (fingerprint {self.fingerprint}, "
                      f"the checkpoint's {saved}): prepare the same data, or pass data.allow_data_change=true "
                      "to continue on this")
    self.seed, self.step = state["seed"], state["step"]
