"""`gptjax attention`: the model's own softmax weights, as heatmaps and arrays."""

import dataclasses

import jax
import numpy as np
from PIL import Image

from gptjax import attention_maps
from gptjax import model as model_lib

from test_explain import LLAMA


def check_weights(weights_LHTT):
  """Each query's weights sum to 1 over the keys, and are exactly 0 for keys after it."""
  np.testing.assert_allclose(weights_LHTT.sum(-1), 1.0, rtol=1e-5)
  T = weights_LHTT.shape[-1]
  above = np.triu(np.ones((T, T), bool), k=1)
  assert np.all(weights_LHTT[..., above] == 0.0) and np.all(weights_LHTT[..., ~above] > 0.0)


def test_grouped_query_weights_are_causal_distributions():
  params = model_lib.init_params(LLAMA, jax.random.key(2))
  weights = attention_maps.attention_weights(LLAMA, params, np.arange(9, dtype=np.int32)[None], [0, 1])
  assert weights.shape == (2, 4, 9, 9)
  check_weights(weights)


def test_the_textbook_variants_weights_are_causal_distributions():
  for variant in (dict(norm_position="post"), dict(positions="none"), dict(attention_scale="none")):
    cfg = dataclasses.replace(LLAMA, **variant)
    weights = attention_maps.attention_weights(cfg, model_lib.init_params(cfg, jax.random.key(2)),
                                               np.arange(9, dtype=np.int32)[None], [1])
    assert weights.shape == (1, 4, 9, 9)
    check_weights(weights)


def test_attention_of_a_checkpoint_writes_a_png_per_block_and_the_arrays(tiny_run, tmp_path, capsys):
  run, _ = tiny_run
  attention_maps.main(["--checkpoint", str(run), "--prompt", "ROMEO: But soft", "--output", str(tmp_path)])
  saved = np.load(tmp_path / "attention.npz")
  assert saved["weights"].shape == (2, 2, 15, 15) and list(saved["layers"]) == [0, 1]
  assert "".join(saved["labels"]) == "ROMEO:␣But␣soft" and len(saved["tokens"]) == 15
  check_weights(saved["weights"])
  width, height = attention_maps.figure_inches(heads=2, positions=15)
  for layer in (0, 1):
    with Image.open(tmp_path / f"layer_{layer}.png") as image:
      assert image.format == "PNG" and image.size == (round(width * attention_maps.DPI), round(height * attention_maps.DPI))
  assert f"{tmp_path}/layer_*.png" in capsys.readouterr().out
