"""Each benchmark script runs on a tiny config and prints its table. No speed is asserted here:
the figures live in benchmarks/RESULTS.md."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptjax import prepare

from conftest import user_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_benchmark(name, *args):
  result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], cwd=ROOT,
                          env=user_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
  """The cells of the markdown table rows whose first cell starts with `first_cell`."""
  return [[c.strip() for c in line.strip("|").split("|")] for line in output.splitlines()
          if line.startswith(f"| {first_cell}")]


@pytest.mark.slow  # 46 s; prepare_speed covers the benchmarks' tiny runs in the default suite
def test_vs_transformers_prints_train_and_sampling_tables():
  output = run_benchmark("vs_transformers.py", "--tiny")
  (train,) = table_rows(output, "GPT-2 2x32")
  assert len(train) == 4 and float(train[1].replace(",", "")) > 0 and train[3].startswith("**")
  assert [row[0] for row in table_rows(output, "batch ")] == ["batch 1", "batch 8"]
  assert "first token of a 32-token prompt, batch 1: gptjax" in output


@pytest.mark.slow  # 37 s; prepare_speed covers the benchmarks' tiny runs in the default suite
def test_accelerator_prints_gptjax_and_torch_rows():
  output = run_benchmark("accelerator.py", "--tiny")
  rows = table_rows(output, "")
  assert [row[0] for row in rows[1:]] == ["gpt2_124m, attention auto, remat none, scanned", "torch: GPT-2 124M, SDPA",
                                          "gpt2_124m, attention xla"], output
  assert all(float(row[2].replace(",", "")) > 0 for row in rows[1:]), output
  assert rows[1][5] == "blocked (auto on cpu); matmuls in float32" and rows[3][5].startswith("xla (model.attention=xla)")
  assert "device: cpu" in output


def test_prepare_speed_prints_workers_against_the_tokenizer_limit():
  output = run_benchmark("prepare_speed.py", "--tiny")
  rows = table_rows(output, "0.003 GB")
  assert rows[0][1] == "encode_ordinary, 1 thread" and float(rows[0][5].replace(",", "")) > 0
  cores = str(prepare.default_workers())
  assert rows[1][1] == f"encode_ordinary_batch, {cores} threads"
  assert [(row[1], row[2]) for row in rows[2:]] == [(kind, workers) for kind in ("text", "jsonl.zst", "parquet")
                                                    for workers in ("1", cores)]
  assert all(row[8].endswith("MiB") for row in rows[2:])


@pytest.mark.slow  # 20 s; prepare_speed covers the benchmarks' tiny runs in the default suite
def test_where_time_goes_prints_the_largest_operations():
  output = run_benchmark("where_time_goes.py", "--tiny")
  rows = table_rows(output, "")
  assert rows[0][0] == "GPT-2 2x32, ctx 32, batch 4, vocab 77" and rows[-1][0].startswith("everything else")
  assert any(row[0] == "backward dot_general" for row in rows)
  assert sum(float(row[2].rstrip("%")) for row in rows[1:]) == pytest.approx(100, abs=len(rows))  # rounded shares


@pytest.mark.slow  # the suite's 15 minutes: run with -m ""
def test_loss_parity_prints_both_implementations(char_data, tmp_path):
  output = run_benchmark("loss_parity.py", f"data.dir={char_data}", "model.n_layer=1", "model.n_embd=32",
                         "model.n_head=2", "model.block_size=16", "train.max_iters=4", "train.eval_iters=2",
                         "train.eval_interval=4", "train.checkpoint_interval=4", "optim.warmup_iters=1",
                         "optim.lr_decay_iters=4")
  rows = table_rows(output, "gptjax") + table_rows(output, "transformers")
  assert len(rows) == 2 and all(len(row) == 4 for row in rows)


@pytest.mark.slow  # the suite's 15 minutes: run with -m ""
def test_checkpoint_cost_prints_its_table():
  output = run_benchmark("checkpoint_cost.py", "--config", "shakespeare_char_cpu", "--rounds", 1)
  assert [row[0] for row in table_rows(output, "")][1:] == ["checksums", "save (async, then waited for)",
                                                            "restore and verify"]


@pytest.mark.slow  # the suite's 15 minutes: run with -m ""
def test_model_sizes_prints_its_table():
  output = run_benchmark("model_sizes.py", "--configs", "shakespeare_char_cpu")
  assert len(table_rows(output, "`shakespeare_char_cpu`")) == 1


@pytest.mark.slow  # the Linen baseline is taken from git history and every variant compiles in a process of its own
def test_nnx_vs_linen_prints_its_tables():
  if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "43e429b"], capture_output=True).returncode:
    pytest.skip("this clone lacks the Linen commit 43e429b (a shallow clone)")
  output = run_benchmark("nnx_vs_linen.py", "--tiny")
  assert len(table_rows(output, "tiny (2x32, ctx 32, batch 12)")) == 1
  assert len(table_rows(output, "tiny (2x32, ctx 32), batch 1")) == 1
  assert len(table_rows(output, "2 layers")) == 1


@pytest.mark.slow  # the suite's 15 minutes: run with -m ""
def test_record_cost_prints_its_table():
  output = run_benchmark("record_cost.py", "--tiny", "--rounds", 1)
  assert len(table_rows(output, "train step")) == 1 and len(table_rows(output, "evaluation's")) == 2


@pytest.mark.slow  # 40 s: two runs with an empty and a filled compilation cache
def test_startup_measures_a_cold_and_a_warm_start():
  rows = table_rows(run_benchmark("startup.py", "--tiny"), "train 4 x 64")
  assert len(rows) == 1 and float(rows[0][1]) > 0 and float(rows[0][2]) > 0, rows


@pytest.mark.slow  # 30 s: one train step's temporaries, compiled three times for 8 devices
def test_loss_memory_reports_the_chunked_steps_temporaries():
  output = run_benchmark("loss_memory.py", "--config", "llama_shakespeare_cpu", "--vocab", "77")
  assert len(table_rows(output, "model.loss_chunk")) == 3, output


def test_data_order_prints_each_loader():
  output = run_benchmark("data_order.py", "--tiny")
  rows = table_rows(output, "gptjax ")
  assert [row[0] for row in rows] == ["gptjax shuffled", "gptjax random"]
  assert all(float(row[2].replace(",", "")) > 0 for row in rows)


@pytest.mark.slow  # 20 s; as above
def test_moe_mlp_prints_the_dense_and_both_routed_kernels():
  output = run_benchmark("moe_mlp.py", "--tiny")
  assert [row[1] for row in table_rows(output, "tiny")] == [
      "dense SwiGLU, same active size", "routed, moe_matmul=tiled", "routed, moe_matmul=ragged_dot"]


@pytest.mark.slow  # 47 s; as above
def test_demo_speed_compares_a_dense_and_a_mixture_with_their_validation_losses(char_data):
  dense, mixture = "model.n_layer=1 model.n_embd=32", "model.n_layer=1 model.n_embd=32 model.n_experts=4 model.expert_hidden=32"
  output = run_benchmark("demo_speed.py", "--config", "llama_shakespeare_cpu", "--data", char_data, "--steps", 40,
                         "--rounds", 1, "--val", "--variants", dense, mixture)
  rows = table_rows(output, str(ROOT))
  assert [row[1] for row in rows] == [dense, mixture] and rows[0][3] == "1.00 (1.00)"
  assert all(2.0 < float(row[4].split()[0]) < 4.3 for row in rows)  # after 40 steps: below the 77-way uniform's 4.34


def test_align_coverage_on_a_hand_made_layout():
  output = run_benchmark("align_coverage.py", "--tiny")
  assert len(table_rows(output, "made up, mean length")) == 2
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import align_coverage
  # 641 tokens, windows of 64 at 0, 64, ..., 576; documents start at 0 and 100: aligned, the window at
  # 64 moves to 100, so positions 64-99 are held by none.
  starts = np.array([0, 100])
  assert align_coverage.coverage(starts, 641, 64, align=False) == (640 / 641, 0.1)
  assert align_coverage.coverage(starts, 641, 64, align=True) == ((640 - 36) / 641, 0.2)


@pytest.mark.slow  # 40 s: four train steps compiled for 8 devices
def test_optimizer_cost_prints_each_optimizer():
  output = run_benchmark("optimizer_cost.py", "--tiny")
  rows = table_rows(output, "")[1:]
  assert [row[0] for row in rows] == ["adamw", "muon", "lion", "adafactor"] and rows[0][2] == "1.000"


@pytest.mark.slow  # 60 s: four 20-step sweeps
def test_recipe_prints_a_row_per_change(tmp_path):
  output = run_benchmark("recipe.py", "--tiny", "--work", tmp_path)
  rows = table_rows(output[output.index("| change to shakespeare_char_cpu"):], "")[1:]  # the sweeps' own tables come before it
  assert [row[0] for row in rows] == ["AdamW + cosine (the baseline)", "AdamW + WSD", "Muon + WSD",
                                      "random windows (nanoGPT's order)"]
  assert all(row[1] == "char" and "±" in row[2] and "±" in row[3] for row in rows)
