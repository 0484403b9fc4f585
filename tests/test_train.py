import jax
import numpy as np
import pytest

from gptjax import train

from conftest import load_checkpoint, tiny_config


def _final_params(out_dir):
  return jax.device_get(load_checkpoint(str(out_dir), "latest")[2])


def test_training_lowers_the_loss(tmp_path, char_data):
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=60", "train.eval_iters=8",
                    "optim.learning_rate=3e-3", "optim.min_lr=3e-4")
  result, _ = train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  assert result["step"] == 60
  assert result["train_loss"] < np.log(77) - 1.0  # 4.34 at random init (77 characters)
  assert result["val_loss"] < np.log(77) - 1.0


def test_resume_continues_exactly(tmp_path, char_data):
  """8 steps straight == 4 steps, stop, --resume, 4 more: same losses, same parameters, bit for bit."""
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4",
            "model.dropout=0.1", "train.grad_accum_steps=2"]
  straight, _ = train.train(tiny_config(tmp_path / "a", *common, "train.max_iters=8"),
                         progress_bar=False, devices=jax.devices()[:1])
  train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=4"), progress_bar=False, devices=jax.devices()[:1])
  resumed, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                        progress_bar=False, devices=jax.devices()[:1])
  assert resumed == straight
  finished, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                         progress_bar=False, devices=jax.devices()[:1])
  assert finished == straight  # resuming a finished run trains nothing and reports its losses
  a, b = _final_params(tmp_path / "a" / "out"), _final_params(tmp_path / "b" / "out")
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_resume_may_change_how_the_blocks_run(tmp_path, char_data):
  """Scanning and remat compute the same values: a run may resume with them changed."""
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4"]
  straight, _ = train.train(tiny_config(tmp_path / "a", *common, "train.max_iters=8"),
                            progress_bar=False, devices=jax.devices()[:1])
  train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=4"), progress_bar=False, devices=jax.devices()[:1])
  resumed, _ = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8", "model.scan_layers=true",
                                       "model.remat=save_dots"), resume=True, progress_bar=False, devices=jax.devices()[:1])
  assert resumed["step"] == 8
  assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)
  assert load_checkpoint(tmp_path / "b" / "out", "latest")[0].model.scan_layers  # the run's config records it
