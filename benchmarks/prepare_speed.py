"""`gptjax prepare` at scale: tokens/s and peak memory for one worker and for every core, beside the
raw single-thread tokenizer speed (tiktoken's `encode_ordinary` on the same documents) as the limit.

    python benchmarks/prepare_speed.py                         # 0.5 GB and 4 GB corpora, three formats
    python benchmarks/prepare_speed.py --sizes-gb 0.5 --formats jsonl.zst
    python benchmarks/prepare_speed.py --tiny                  # a 3 MB corpus: the script works

The corpus is generated from public-domain Gutenberg texts (--texts: a folder of .txt files, by
default ../shared/data/shakespeare, else the built-in plays): cut into documents of 2-40 KB,
shuffled and repeated to the size asked, written as text files (one 1 MB document each), JSON Lines
shards compressed with zstd, and Parquet shards. Every run is `gptjax prepare` in a fresh process;
its peak memory is the largest sum of the resident memory of it and its workers, sampled every 0.1 s.
Prints a markdown table.
"""

import argparse
import json
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gptjax import prepare  # noqa: E402
from gptjax import sources  # noqa: E402

SHARD_BYTES = 128 << 20  # JSONL and Parquet shards of this much text


def _documents(texts: str | None, rng: np.random.Generator) -> list[str]:
  """Documents of 2-40 KB cut from the Gutenberg texts."""
  folder = pathlib.Path(texts) if texts else ROOT.parent / "shared" / "data" / "shakespeare"
  books = [p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.txt"))] if folder.is_dir() else []
  books = books or [sources.read_text(sources.BUILTIN_SHAKESPEARE)]
  docs = []
  for book in books:
    start = 0
    while start < len(book):
      end = min(len(book), start + int(rng.integers(2_000, 40_000)))
      docs.append(book[start:end])
      start = end
  return docs


def build_corpus(where: pathlib.Path, size: int, formats: list[str], texts: str | None) -> dict[str, str]:
  """The corpus of about `size` bytes in each format; returns {format: --input}."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  writers = {kind: (where / kind) for kind in formats}
  inputs = {"text": str(writers.get("text")), "jsonl.zst": f"{writers.get('jsonl.zst')}/*.jsonl.zst",
            "parquet": f"{writers.get('parquet')}/*.parquet"}
  if all((folder / ".complete").exists() for folder in writers.values()):  # built by an earlier run
    return {kind: inputs[kind] for kind in formats}
  rng = np.random.default_rng(0)
  docs, written = _documents(texts, rng), 0
  where.mkdir(parents=True, exist_ok=True)
  for folder in writers.values():
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
  shard, shard_bytes, n_shard, text_file, n_text = [], 0, 0, [], 0

  def flush_shard():
    nonlocal shard, shard_bytes, n_shard
    if "jsonl.zst" in formats:
      lines = "".join(json.dumps({"text": d}) + "\n" for d in shard).encode()
      (writers["jsonl.zst"] / f"{n_shard:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    if "parquet" in formats:
      pq.write_table(pa.table({"text": shard}), writers["parquet"] / f"{n_shard:05d}.parquet")
    shard, shard_bytes, n_shard = [], 0, n_shard + 1

  while written < size:
    for i in rng.permutation(len(docs)):
      doc = docs[i]
      shard.append(doc)
      text_file.append(doc)
      n = len(doc.encode())
      written, shard_bytes = written + n, shard_bytes + n
      if shard_bytes >= SHARD_BYTES:
        flush_shard()
      if sum(map(len, text_file)) >= 1 << 20:
        if "text" in formats:
          (writers["text"] / f"{n_text:06d}.txt").write_text("".join(text_file))
        text_file, n_text = [], n_text + 1
      if written >= size:
        break
  if shard:
    flush_shard()
  if text_file and "text" in formats:
    (writers["text"] / f"{n_text:06d}.txt").write_text("".join(text_file))
  for folder in writers.values():
    (folder / ".complete").touch()
  return {kind: inputs[kind] for kind in formats}


def _rss(pid: int) -> int:
  """Resident bytes of a process and its descendants (Linux /proc)."""
  total = 0
  try:
    with open(f"/proc/{pid}/status") as f:
      total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      total += sum(_rss(int(child)) for child in f.read().split())
  except (OSError, StopIteration):
    pass
  return total


def run_prepare(source: str, out: pathlib.Path, workers: int) -> dict:
  command = [sys.executable, "-m", "gptjax.cli", "prepare", "--input", source, "--tokenizer", "gpt2",
             "--out", str(out), "--workers", str(workers), "--overwrite", "--no-progress"]
  started, peak = time.perf_counter(), 0
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  while process.poll() is None:
    peak = max(peak, _rss(process.pid))
    time.sleep(0.1)
  seconds = time.perf_counter() - started
  stdout, stderr = process.communicate()
  if process.returncode:
    raise SystemExit(f"prepare failed: {stderr.strip()}")
  meta = json.loads((out / "meta.json").read_text())
  tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
  return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "peak_rss": peak}


def raw_speed(source: str, limit_bytes: int, threads: int = 0) -> dict:
  """encode_ordinary, one thread (or tiktoken's encode_ordinary_batch on `threads`), in a fresh
  process, on the first `limit_bytes` of the documents."""
  code = f"""
import json, time, sys
sys.path.insert(0, {str(ROOT)!r})
from gptjax import sources, tokenizer
enc, texts, size = tokenizer._gpt2_encoding(), [], 0
for records in sources.open_source({source!r}).read():
  for text in records.texts():
    texts.append(text); size += len(text.encode())
  if size >= {limit_bytes}: break
start = time.perf_counter()
if {threads}:
  tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads={threads})))
else:
  tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
seconds = time.perf_counter() - start
print(json.dumps({{"tokens_per_s": tokens / seconds, "mb_per_s": size / 1e6 / seconds}}))
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(result.stdout)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 4.0])
  parser.add_argument("--formats", nargs="+", default=["text", "jsonl.zst", "parquet"])
  parser.add_argument("--one-worker-up-to-gb", type=float, default=1.0, help="larger corpora: every core only")
  parser.add_argument("--texts", default=None, help="a folder of .txt files to build the corpus from")
  parser.add_argument("--workdir", default=None, help="where the corpora go (default: a temporary folder)")
  parser.add_argument("--tiny", action="store_true", help="a 3 MB corpus: the script works")
  args = parser.parse_args()
  sizes = [0.003] if args.tiny else args.sizes_gb
  cores = prepare.default_workers()
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="gptjax_prepare_bench_"))
  print(f"# gptjax prepare, {platform.processor() or platform.machine()}, {cores} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}\n")
  print("| corpus | format | workers | tokens | seconds | tokens/s | x single-thread limit | of cores x limit | peak RSS |")
  print("|---|---|---|---|---|---|---|---|---|")
  for size_gb in sizes:
    corpus = build_corpus(work / f"{size_gb}gb", int(size_gb * 1e9), args.formats, args.texts)
    first = next(iter(corpus.values()))
    limits = [raw_speed(first, min(int(size_gb * 1e9), 100 << 20))]
    rows = []
    for kind, source in corpus.items():
      for workers in ([1, cores] if size_gb <= args.one_worker_up_to_gb else [cores]):
        rows.append((kind, workers, run_prepare(source, work / "out", workers)))
    limits.append(raw_speed(first, min(int(size_gb * 1e9), 100 << 20)))  # before and after: the machine drifts
    threads = raw_speed(first, min(int(size_gb * 1e9), 100 << 20), threads=cores)
    limit = statistics.median(r["tokens_per_s"] for r in limits)
    print(f"| {size_gb:g} GB | encode_ordinary, 1 thread | - | - | - | {limit:,.0f} | 1.00 | - | - |")
    print(f"| {size_gb:g} GB | encode_ordinary_batch, {cores} threads | - | - | - | {threads['tokens_per_s']:,.0f} | "
          f"{threads['tokens_per_s'] / limit:.2f} | {threads['tokens_per_s'] / (limit * cores):.2f} | - |")
    for kind, workers, r in rows:
      print(f"| {size_gb:g} GB | {kind} | {workers} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / limit:.2f} | {r['tokens_per_s'] / (limit * workers):.2f} | "
            f"{r['peak_rss'] / 2**20:,.0f} MiB |")
    sys.stdout.flush()
  if not args.workdir:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
