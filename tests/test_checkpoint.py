import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint
from gptjax import config as config_lib


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
