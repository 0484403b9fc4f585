import jax
import numpy as np
import pytest

from gptjax import sample
from gptjax import train

from conftest import tiny_config


def _final_params(out_dir):
  return jax.device_get(sample.load_params(str(out_dir), "latest")[2])


def test_training_lowers_the_loss(tmp_path, char_data):
  cfg = tiny_config(tmp_path, f"data.dir={char_data}", "train.max_iters=60", "train.eval_iters=8",
                    "optim.learning_rate=3e-3", "optim.min_lr=3e-4")
  result = train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  assert result["step"] == 60
  assert result["train_loss"] < np.log(77) - 1.0  # 4.34 at random init (77 characters)
  assert result["val_loss"] < np.log(77) - 1.0


def test_resume_continues_exactly(tmp_path, char_data):
  """8 steps straight == 4 steps, stop, --resume, 4 more: same losses, same parameters, bit for bit."""
  common = [f"data.dir={char_data}", "train.checkpoint_interval=4", "train.eval_interval=4",
            "model.dropout=0.1", "train.grad_accum_steps=2"]
  straight = train.train(tiny_config(tmp_path / "a", *common, "train.max_iters=8"),
                         progress_bar=False, devices=jax.devices()[:1])
  train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=4"), progress_bar=False, devices=jax.devices()[:1])
  resumed = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                        progress_bar=False, devices=jax.devices()[:1])
  assert resumed == straight
  finished = train.train(tiny_config(tmp_path / "b", *common, "train.max_iters=8"), resume=True,
                         progress_bar=False, devices=jax.devices()[:1])
  assert finished == straight  # resuming a finished run trains nothing and reports its losses
  a, b = _final_params(tmp_path / "a" / "out"), _final_params(tmp_path / "b" / "out")
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("mesh", [("mesh.data=8",)])
def test_eight_devices_match_one_device(tmp_path, char_data, mesh):
  assert jax.device_count() == 8
  common = [f"data.dir={char_data}", "train.max_iters=6", "train.checkpoint_interval=6", "train.eval_interval=6"]
  one = train.train(tiny_config(tmp_path / "one", *common), progress_bar=False, devices=jax.devices()[:1])
  eight = train.train(tiny_config(tmp_path / "eight", *common, *mesh), progress_bar=False)
  assert eight["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
  assert eight["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
  a, b = _final_params(tmp_path / "one" / "out"), _final_params(tmp_path / "eight" / "out")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), a, b)
