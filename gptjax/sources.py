"""Corpora read as streams of documents, in order and in bounded memory.

    builtin:shakespeare        the embedded ~1 MB of Shakespeare's plays (one document)
    PATH, FOLDER or 'GLOB'     files, each by its name: *.parquet (a text column),
                               *.jsonl / *.json, optionally .gz or .zst (a text field per line),
                               anything else UTF-8 text (one document per file)
    hf:PATH_OR_NAME            a Hugging Face dataset saved with save_to_disk, or in the local hub cache
    tfds:NAME                  a prepared TFDS dataset, read through tfds.data_source (no TensorFlow)

A source yields `Records`: a few documents from one place, still raw where that saves the main
process work (JSON lines are parsed by the worker that tokenizes them), and how far through the
source they reach, in its unit (bytes of its files, or documents). A text file is one document; a
large one comes in pieces cut before a space between two non-spaces, where the BPE pre-tokenizers
of GPT-2 and Llama 3 split anyway, so its pieces encode to the tokens of the whole.
"""

import codecs
import dataclasses
import glob
import gzip
import importlib.resources
import io
import json
import os
import pathlib
import zlib
from collections.abc import Callable
from collections.abc import Iterator

from gptjax.errors import UserError

BUILTIN_SHAKESPEARE = "builtin:shakespeare"
PIECE_CHARS = 1 << 20  # text is handed out about a million characters at a time
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclasses.dataclass
class Records:
  """Documents from one place. `piece` is (first, last) when `items` is one piece of a document."""

  items: list  # str documents (or pieces), bytes lines of JSON, or a pyarrow string array
  json_key: str | None = None  # the field holding the text, when items are JSON lines
  where: str = ""  # file name, for errors
  first_line: int = 1  # of a JSON batch, for errors
  piece: tuple[bool, bool] | None = None
  split: str = "train"  # or "val", when the source has its own validation split
  reach: int = 0  # how far through the source, in its unit

  @property
  def documents(self) -> int:
    """How many documents end here (a piece ends one if it is a document's last): the next
    records' first document is this one's plus this."""
    return len(self.items) if self.piece is None else int(self.piece[1])

  @property
  def chars(self) -> int:
    """About how much text: characters, or bytes of JSON or Arrow data."""
    return sum(map(len, self.items)) if isinstance(self.items, list) else self.items.nbytes

  def texts(self) -> list[str]:
    """The items as text; blank JSON lines and null values give empty documents."""
    if not isinstance(self.items, list):  # Arrow: made into Python strings by the worker, not the reader
      return [text or "" for text in self.items.to_pylist()]
    if self.json_key is None:
      return self.items
    return [_json_text(line, self.json_key, self.where, self.first_line + i) for i, line in enumerate(self.items)]


def _json_text(line: bytes, key: str, where: str, line_number: int) -> str:
  if not line.strip():
    return ""
  try:
    value = json.loads(line)[key]
  except (ValueError, TypeError, KeyError, IndexError):
    raise UserError(f"{where} line {line_number} is not a JSON object with a {key!r} field "
                    "(--text-key names the field)") from None
  if not isinstance(value, str):
    raise UserError(f"{where} line {line_number}: field {key!r} is {type(value).__name__}, not text")
  return value


@dataclasses.dataclass
class Source:
  name: str
  total: int  # in `unit`
  unit: str  # "B" (bytes of files) or "doc"
  has_val: bool  # whether the source brings its own validation split
  read: Callable[[], Iterator[Records]]


def open_source(source: str, *, text_key: str = "text", tfds_data_dir: str | None = None) -> Source:
  if source == BUILTIN_SHAKESPEARE:
    path = pathlib.Path(str(importlib.resources.files("gptjax") / "assets" / "shakespeare.txt"))
    return _files_source(source, [path], text_key)
  if source.startswith("tfds:"):
    return _tfds_source(source, text_key, tfds_data_dir)
  if source.startswith("hf:"):
    return _hf_source(source, text_key)
  return _files_source(source, _files(source), text_key)


def _files(source: str) -> list[pathlib.Path]:
  path = pathlib.Path(source)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*")  # hidden files and folders (.git) are not text
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
  else:
    files = sorted(pathlib.Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
  if not files:
    raise UserError(f"no text found at {source!r}: not a file, a folder with files, or a matching glob")
  return files


def read_text(source: str) -> str:
  """The whole text of a file, of a folder's files or of a glob's matches (sorted by name, joined):
  for evaluation texts, which are small."""
  if source == BUILTIN_SHAKESPEARE:
    return (importlib.resources.files("gptjax") / "assets" / "shakespeare.txt").read_text(encoding="utf-8")
  parts = []
  for path in _files(source):
    try:
      parts.append(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
      raise UserError(f"{path} is not UTF-8 text") from None
  return "".join(parts)


def _kind(path: pathlib.Path) -> str:
  suffixes = [s for s in path.suffixes if s not in (".gz", ".zst")]
  if path.suffix == ".parquet":
    return "parquet"
  return "json" if suffixes and suffixes[-1] in _JSON_SUFFIXES else "text"


def _files_source(name: str, files: list[pathlib.Path], text_key: str) -> Source:
  sizes = [f.stat().st_size for f in files]

  def read() -> Iterator[Records]:
    done = 0
    for path, size in zip(files, sizes):
      reader = {"text": _text_pieces, "json": _json_lines, "parquet": _parquet_rows}[_kind(path)]
      for records in reader(path, text_key):
        records.reach += done
        yield records
      done += size
  return Source(name, sum(sizes), "B", False, read)


def _open(path: pathlib.Path):
  try:
    return open(path, "rb")
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None


def _first_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _text_pieces(path: pathlib.Path, text_key: str) -> Iterator[Records]:
  decoder = codecs.getincrementaldecoder("utf-8")()

  def decode(block: bytes, final: bool = False) -> str:
    try:
      return decoder.decode(block, final)
    except UnicodeDecodeError:
      raise UserError(f"{path} is not UTF-8 text") from None

  with _open(path) as f:
    buffer, first = "", True
    while block := f.read(PIECE_CHARS):
      buffer += decode(block)
      while len(buffer) >= 2 * PIECE_CHARS:
        cut = _cut(buffer, PIECE_CHARS)
        yield Records([buffer[:cut]], where=str(path), piece=(first, False), reach=f.tell())
        buffer, first = buffer[cut:], False
    buffer += decode(b"", final=True)
    yield Records([buffer], where=str(path), piece=(first, True), reach=f.tell())


def _cut(text: str, at: int) -> int:
  """Where to cut `text` near `at`: before a space between two non-spaces (else at `at`)."""
  i = text.rfind(" ", 1, at)
  while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
    i = text.rfind(" ", 1, i)
  return i if i > 0 else at


def _json_lines(path: pathlib.Path, text_key: str) -> Iterator[Records]:
  import zstandard
  with _open(path) as raw:
    if path.suffix == ".gz":
      stream = gzip.GzipFile(fileobj=raw)
    elif path.suffix == ".zst":
      stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    else:
      stream = raw
    lines, size, first_line = [], 0, 1
    try:
      for number, line in enumerate(stream, 1):
        lines.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
          yield Records(lines, text_key, str(path), first_line, reach=raw.tell())
          lines, size, first_line = [], 0, number + 1
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:  # corrupt or truncated input
      raise UserError(f"cannot read {path}: {_first_line(e)}") from None
    yield Records(lines, text_key, str(path), first_line, reach=raw.tell())


def _parquet_rows(path: pathlib.Path, text_key: str) -> Iterator[Records]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:  # column chunks read in buffered pieces: memory is bounded by a row group's decoded text
    parquet = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
  except (pa.ArrowException, OSError) as e:
    raise UserError(f"cannot read {path} as Parquet: {_first_line(e)}") from None
  schema = parquet.schema_arrow
  if text_key not in schema.names:
    raise UserError(f"{path} has no column {text_key!r} (--text-key); it has {schema.names}")
  kind = schema.field(text_key).type
  kind = kind.value_type if pa.types.is_dictionary(kind) else kind
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
    raise UserError(f"{path}: column {text_key!r} is {schema.field(text_key).type}, not text")
  rows, size = 0, path.stat().st_size
  batches = parquet.iter_batches(batch_size=256, columns=[text_key], use_threads=False)
  while True:
    try:
      batch = next(batches, None)
    except (pa.ArrowException, OSError) as e:
      raise UserError(f"cannot read {path} as Parquet: {_first_line(e)}") from None
    if batch is None:
      return
    rows += batch.num_rows
    yield Records(batch.column(0), where=str(path), reach=size * rows // max(parquet.metadata.num_rows, 1))


def _split_names(names) -> dict[str, str]:
  """Our split -> the source's: train, and validation (or test) as val."""
  ours = {"train": "train"} if "train" in names else {}
  held_out = next((name for name in ("validation", "valid", "val", "test") if name in names), None)
  return ours | ({"val": held_out} if held_out else {})


def _hf_source(source: str, text_key: str) -> Source:
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data only: nothing is downloaded
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import datasets
  except ImportError:
    raise UserError("hf: input needs the datasets library: pip install 'gptjax[hf]'") from None
  name = source[len("hf:"):]
  folder = pathlib.Path(name).expanduser()  # the shell leaves hf:~/... as it is
  try:
    loaded = datasets.load_from_disk(str(folder)) if folder.is_dir() else datasets.load_dataset(name)
  except Exception as e:  # datasets raises many types for a missing, unbuilt or uncached dataset
    raise UserError(f"cannot open Hugging Face dataset {name!r} (on disk or in the local cache): "
                    f"{_first_line(e)}") from None
  splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else \
      {ours: loaded[theirs] for ours, theirs in _split_names(list(loaded)).items()}
  if "train" not in splits:
    raise UserError(f"Hugging Face dataset {name!r} has no train split; it has {list(loaded)}")
  for dataset in splits.values():
    if text_key not in dataset.column_names:
      raise UserError(f"Hugging Face dataset {name!r} has no column {text_key!r} (--text-key); "
                      f"it has {dataset.column_names}")
    if getattr(dataset.features[text_key], "dtype", None) not in ("string", "large_string"):
      raise UserError(f"Hugging Face dataset {name!r}: column {text_key!r} is {dataset.features[text_key]}, not text")

  def read() -> Iterator[Records]:
    done = 0
    for split, dataset in splits.items():
      for batch in dataset.select_columns([text_key]).iter(batch_size=1024):
        done += len(batch[text_key])
        yield Records([text or "" for text in batch[text_key]], where=name, split=split, reach=done)
  return Source(source, sum(len(d) for d in splits.values()), "doc", "val" in splits, read)


def _tfds_source(source: str, text_key: str, data_dir: str | None) -> Source:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError("TFDS input needs tensorflow-datasets: pip install 'gptjax[tfds]'") from None
  name = source[len("tfds:"):]
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    names = list(builder.info.splits.keys())
    if not names:
      raise UserError(f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default data dir'}")
    splits = {ours: tfds.data_source(name, data_dir=data_dir, split=theirs)
              for ours, theirs in _split_names(names).items()}
  except UserError:
    raise
  except Exception as e:  # tfds raises many types for a missing, unbuilt or tfrecord-only dataset
    raise UserError(f"cannot open TFDS dataset {name!r}: {_first_line(e)}") from None
  if "train" not in splits:
    raise UserError(f"TFDS dataset {name!r} has no train split; it has {names}")
  for data in splits.values():
    if len(data) and text_key not in data[0]:
      raise UserError(f"TFDS dataset {name!r} has no feature {text_key!r}; it has {sorted(data[0])}")

  def read() -> Iterator[Records]:
    done = 0
    for split, data in splits.items():
      for start in range(0, len(data), 256):
        texts = [_as_str(data[i][text_key]) for i in range(start, min(start + 256, len(data)))]
        done += len(texts)
        yield Records(texts, where=name, split=split, reach=done)
  return Source(source, sum(len(d) for d in splits.values()), "doc", "val" in splits, read)


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
