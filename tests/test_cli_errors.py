"""Bad input: a one-line error on stderr, exit status 2, and existing outputs left untouched."""

import jax
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, digest, one_line_error, run_cli


def test_missing_input_data(tmp_path):
  one_line_error(run_cli("prepare", "--input", tmp_path / "nope.txt", "--out", tmp_path / "d"), "no text found")


def test_empty_input_data(tmp_path):
  (tmp_path / "empty.txt").write_text("  \n")
  one_line_error(run_cli("prepare", "--input", tmp_path / "empty.txt", "--out", tmp_path / "d"), "holds no text")
  assert not (tmp_path / "d").exists()


def test_training_without_prepared_data(tmp_path):
  one_line_error(run_cli("train", "shakespeare_char_cpu", f"data.dir={tmp_path / 'none'}",
                          f"train.out_dir={tmp_path / 'out'}"), "no prepared data", "gptjax prepare")


def test_text_shorter_than_one_block(tmp_path):
  (tmp_path / "short.txt").write_text("To be, or not to be, that is the question. " * 3)
  assert run_cli("prepare", "--input", tmp_path / "short.txt", "--out", tmp_path / "d").returncode == 0
  one_line_error(run_cli("train", "shakespeare_char_cpu", f"data.dir={tmp_path / 'd'}",
                          f"train.out_dir={tmp_path / 'out'}"), "fewer than one block")


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=4", "Key 'n_layers' not in 'ModelConfig'"),
    ("nonsense.key=1", "Key 'nonsense' not in 'Config'"),
    ("train.max_iters=many", "train.max_iters"),
    ("model.dropout=2.0", "model.dropout=2.0 is not in [0, 1)"),
    ("model.n_head=5", "not divisible by model.n_head=5"),
    ("distributed.num_processes=-2", "distributed.num_processes=-2 is negative"),
    ("model.remat=true", "model.remat='True' is not one of none, full, save_dots (what was model.remat=true is now full)"),
    ("mesh.fsdp=3", "mesh axes [-1, 3, 1] do not divide the 1 devices"),
    ("model.n_head=0", "model.vocab_size, block_size, n_layer, n_head and n_embd must be positive"),
    ("train.max_bad_steps=0", "max_bad_steps must be positive"),
])
def test_bad_config_key_or_value(tmp_path, char_data, override, message):
  one_line_error(run_cli("train", "shakespeare_char_cpu", override, f"data.dir={char_data}",
                         f"train.out_dir={tmp_path / 'out'}"), message)
  assert not (tmp_path / "out").exists()


def test_unknown_config_name():
  one_line_error(run_cli("train", "shakespeare_xl"), "unknown config 'shakespeare_xl'", "shakespeare_char_cpu")


def test_bad_command_line_flag():
  one_line_error(run_cli("sample", "--checkpoint", "x", "--temprature", "1"), "unrecognized arguments")


def test_missing_checkpoint(tmp_path):
  one_line_error(run_cli("sample", "--checkpoint", tmp_path / "nothing"), "no checkpoint in")
  one_line_error(run_cli("perplexity", "--checkpoint", tmp_path / "nothing", "--split", "val"), "no checkpoint in")


def test_resume_without_checkpoint(tmp_path, char_data):
  one_line_error(run_cli("train", "shakespeare_char_cpu", f"data.dir={char_data}",
                          f"train.out_dir={tmp_path / 'out'}", "--resume"), "--resume: no checkpoint")


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "1000"], "top_k=1000 is not in [0, 77]"),
    (["--temperature", "-0.5"], "temperature=-0.5 is not a number >= 0"),
    (["--temperature", "nan"], "temperature=nan is not a number >= 0"),
    (["--top-p", "0"], "top_p=0.0 is not in (0, 1]"),
    (["--step", "123456"], "no checkpoint '123456'"),
    (["--prompt", "\u00e9t\u00e9"], "is not in the character vocabulary"),
])
def test_bad_sampling_arguments(tiny_run, flags, message):
  out_dir, _ = tiny_run
  before = digest(out_dir)
  one_line_error(run_cli("sample", "--checkpoint", out_dir, "--max-new-tokens", 5, *flags), message)
  assert digest(out_dir) == before


@pytest.mark.parametrize("flags, message", [
    (["--split", "val", "--step", "123456"], "no checkpoint '123456'"),
    (["--split", "val", "--batch-size", "0"], "batch_size=0 is not positive"),
    (["--split", "val", "--stride", "0"], "stride=0 is not in [1, block_size=32]"),
    (["--split", "val", "mesh.fsdp=3"], "mesh axes [-1, 3, 1] do not divide the 1 devices"),
    (["--split", "val", "model.n_layer=3"], "only mesh.* overrides apply here, not 'model.n_layer=3'"),
])
def test_bad_perplexity_arguments(tiny_run, flags, message):
  out_dir, data_dir = tiny_run
  before = digest(out_dir), digest(data_dir)
  one_line_error(run_cli("perplexity", "--checkpoint", out_dir, *flags), message)
  assert (digest(out_dir), digest(data_dir)) == before


def test_perplexity_of_text_outside_the_vocabulary(tiny_run, tmp_path):
  out_dir, _ = tiny_run
  (tmp_path / "french.txt").write_text("été à Paris")
  one_line_error(run_cli("perplexity", "--checkpoint", out_dir, "--text", tmp_path / "french.txt"),
                 "is not in the character vocabulary")


def test_fine_tuning_from_a_model_of_another_tokenizer(tiny_run, tmp_path):
  out_dir, _ = tiny_run
  (tmp_path / "abc.txt").write_text("abc cab bac " * 400)
  assert run_cli("prepare", "--input", tmp_path / "abc.txt", "--out", tmp_path / "abc").returncode == 0
  before = digest(out_dir)
  one_line_error(run_cli("train", "shakespeare_char_cpu", *TINY_OVERRIDES, f"data.dir={tmp_path / 'abc'}",
                         f"train.init_from={out_dir}", f"train.out_dir={tmp_path / 'tuned'}"),
                 "was prepared with another tokenizer (char, 4 characters)", "(char, 77 characters)")
  assert digest(out_dir) == before and not (tmp_path / "tuned").exists()


def test_training_never_overwrites_an_existing_run(tiny_run):
  out_dir, data_dir = tiny_run
  before = digest(out_dir)
  one_line_error(run_cli("train", "shakespeare_char_cpu", *TINY_OVERRIDES, f"data.dir={data_dir}",
                          f"train.out_dir={out_dir}"), "already holds checkpoints", "--resume")
  one_line_error(run_cli("train", "shakespeare_char_cpu", *TINY_OVERRIDES, "model.n_layer=3",
                          f"data.dir={data_dir}", f"train.out_dir={out_dir}", "--resume"), "model config differs")
  assert digest(out_dir) == before


def test_input_that_is_not_utf8(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 20)
  one_line_error(run_cli("prepare", "--input", tmp_path / "latin1.txt", "--out", tmp_path / "d"), "is not UTF-8 text")
  assert not (tmp_path / "d").exists()


def test_batch_that_the_mesh_does_not_divide(tmp_path, char_data):
  from gptjax import train
  from gptjax.errors import UserError
  from conftest import tiny_config
  with pytest.raises(UserError, match=r"train.batch_size=12 is not divisible by data\*fsdp=8"):
    train.train(tiny_config(tmp_path, f"data.dir={char_data}", "train.batch_size=12"), progress_bar=False)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("log, save", [(1, 1), (10, 1), (2, 3)])
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, char_data, log, save):
  """A learning rate of 1e9 makes the loss NaN from step 3 on: those updates are skipped, the run
  stops after train.max_bad_steps of them, and every checkpoint holds finite parameters."""
  from gptjax import checkpoint
  out = tmp_path / "out"
  result = run_cli("train", "shakespeare_char_cpu", *TINY_OVERRIDES, f"data.dir={char_data}", f"train.out_dir={out}",
                   "optim.learning_rate=1e9", "optim.min_lr=0", "optim.grad_clip=0", "train.max_bad_steps=3",
                   f"train.log_interval={log}", f"train.checkpoint_interval={save}", f"train.eval_interval={save}",
                   "--no-progress")
  one_line_error(result, "not finite for", "steps in a row, from step 3 (train.max_bad_steps=3)",
                 "lower optim.learning_rate")
  assert "skipped 1 non-finite steps so far" in result.stdout or log > 1
  manager = checkpoint.open_manager(str(out), create=False)
  assert manager.all_steps()
  for step in manager.all_steps():
    params = checkpoint.load_for_inference(str(out), str(step))[2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params))), step
  if save == 1:  # step 1 (a learning rate of 0) is the one finite validation loss: it is the best, and kept
    assert manager.best_step() == 1
  manager.close()
  sampled = run_cli("sample", "--checkpoint", out, "--max-new-tokens", 5, "--num-samples", 1)
  assert sampled.returncode == 0, sampled.stderr


def test_a_prompt_file_that_is_not_utf8(tiny_run, tmp_path):
  out_dir, _ = tiny_run
  (tmp_path / "prompt.txt").write_bytes("R\u00e9mi:".encode("latin-1"))
  one_line_error(run_cli("sample", "--checkpoint", out_dir, "--prompt-file", tmp_path / "prompt.txt"), "is not UTF-8 text")


@pytest.mark.parametrize("yaml_text, message", [
    ("model:\n  n_layer: [1, 2\n", "cannot read config"),
    ("model:\n  n_layer: 2\nmodel:\n  n_head: 2\n", "cannot read config"),
])
def test_a_config_file_that_is_not_valid_yaml(tmp_path, yaml_text, message):
  (tmp_path / "bad.yaml").write_text(yaml_text)
  one_line_error(run_cli("train", tmp_path / "bad.yaml"), message)


def test_damaged_prepared_data(tmp_path, char_data):
  import shutil
  broken_meta, short_bin = tmp_path / "meta", tmp_path / "bin"
  for copy in (broken_meta, short_bin):
    shutil.copytree(char_data, copy)
  (broken_meta / "meta.json").write_text("{not json")
  with open(short_bin / "train.bin", "ab") as f:
    f.write(b"\0")  # one byte: half a uint16 token
  before = digest(tmp_path)
  one_line_error(run_cli("train", "shakespeare_char_cpu", f"data.dir={broken_meta}", f"train.out_dir={tmp_path / 'o1'}"),
                 "meta.json is not readable JSON")
  one_line_error(run_cli("train", "shakespeare_char_cpu", f"data.dir={short_bin}", f"train.out_dir={tmp_path / 'o2'}"),
                 "train.bin is not a whole number of uint16 tokens")
  assert digest(tmp_path) == before
