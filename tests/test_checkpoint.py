import pathlib

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gptjax import checkpoint
from gptjax import config as config_lib

from conftest import TINY_OVERRIDES, digest, one_line_error, run_cli, tiny_config


def test_keeps_the_latest_and_the_best_by_validation_loss(tmp_path):
  manager = checkpoint.open_manager(str(tmp_path), keep=2)
  params = {"w": jnp.arange(4.0)}
  for step, val_loss in [(10, 1.5), (20, 3.0), (30, 2.5), (40, 2.8)]:
    checkpoint.save(manager, step, params=params, opt_state={"mu": params["w"] * step},
                    progress={"step": step}, config=config_lib.Config(), tokenizer={"kind": "gpt2"},
                    val_loss=val_loss)
  manager.wait_until_finished()
  assert manager.all_steps() == [10, 30, 40]  # the best (10) and the latest two
  assert checkpoint.select_step(manager, str(tmp_path), "best") == 10
  assert checkpoint.select_step(manager, str(tmp_path), "latest") == 40
  cfg, tokenizer = checkpoint.read_config(manager, 30)
  assert cfg == config_lib.Config() and tokenizer == {"kind": "gpt2"}
  abstract = {"w": jnp.zeros(4)}
  _, opt_state, progress = checkpoint.restore_train_state(manager, 30, abstract, {"mu": jnp.zeros(4)})
  np.testing.assert_array_equal(opt_state["mu"], np.arange(4.0) * 30)
  assert progress == {"step": 30}
  manager.close()


def _save_linen_layout_run(out_dir, char_data):
  """A run directory as gptjax 0.1 (Flax Linen) wrote it: blocks h_0..h_N, no `format` item."""
  cfg = config_lib.to_dict(tiny_config(out_dir, f"data.dir={char_data}"))
  cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "scan_layers"} | {"remat": False}
  block = {"ln_1": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}
  params = {"wte": {"embedding": jnp.zeros((77, 32))}, "h_0": block, "h_1": block}
  manager = checkpoint.open_manager(str(out_dir))
  manager.save(15, metrics={"val_loss": 2.5}, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave({"mu": params}),
      progress=ocp.args.JsonSave({"step": 15, "data": {"seed": 1337, "step": 15}}),
      config=ocp.args.JsonSave(cfg), tokenizer=ocp.args.JsonSave({"kind": "char", "chars": "ab"})))
  manager.wait_until_finished()
  manager.close()


def test_a_checkpoint_of_the_old_layout_is_refused_with_the_way_forward(tmp_path, char_data):
  old = tmp_path / "old"
  _save_linen_layout_run(old, char_data)
  before = digest(old)
  how = ("layout 1", "h_0..h_N", "gptjax convert export")
  one_line_error(run_cli("sample", "--checkpoint", old, "--max-new-tokens", 5), *how)
  one_line_error(run_cli("perplexity", "--checkpoint", old, "--split", "val"), *how)
  one_line_error(run_cli("convert", "export", old, tmp_path / "hf"), *how)
  one_line_error(run_cli("train", "shakespeare_char_cpu", *TINY_OVERRIDES, f"data.dir={char_data}",
                         f"train.out_dir={old}", "--resume"), *how)
  one_line_error(run_cli("train", "shakespeare_char_cpu", *TINY_OVERRIDES, f"data.dir={char_data}",
                         f"train.init_from={old}", f"train.out_dir={tmp_path / 'tuned'}"), *how)
  assert digest(old) == before and not (tmp_path / "hf").exists()


def test_every_checkpoint_records_its_layout(tiny_run):
  out_dir, _ = tiny_run
  manager = checkpoint.open_manager(str(out_dir), create=False)
  for step in manager.all_steps():
    checkpoint.check_format(manager, step)  # raises for any other layout
    assert (pathlib.Path(manager.directory) / str(step) / "format").is_dir()
  manager.close()
