"""Document masking: a packed window's loss is the sum of its documents' losses computed alone, on
GPT-2 and the Llama family, with the blocked, XLA and (interpreted) splash kernels, on one device
and on a mesh; the cuDNN and splash steps lower with their segment inputs; positions restart at
each document where asked; which token opens documents."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import data
from gptjax import lower
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax.config import MeshConfig, ModelConfig
from gptjax.errors import UserError
from gptjax.model import documents

START = 7  # the token that opens a document in these windows
GPT2 = ModelConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=64)
LLAMA = dataclasses.replace(GPT2, n_kv_head=2, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                            tie_embeddings=False)


def _windows(B: int, T: int, seed: int = 0) -> np.ndarray:
  """[B, T + 1] tokens without START, then START at a few places per row (one right at the start of
  row 1, two in a row in row 2: a document of one token)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, 96, (B, T + 1))
  for b in range(B):
    tokens[b, rng.choice(np.arange(1, T), size=3, replace=False)] = START
  tokens[1, 0] = START
  tokens[2, 20:22] = START
  return tokens


def test_split_counts_documents_and_their_positions():
  tokens = np.array([[3, 4, START, 5, 6, 6, START, START, 9]])
  split = documents.split(jnp.asarray(tokens), START, restart_positions=True)
  np.testing.assert_array_equal(split.segments_BT, [[0, 0, 1, 1, 1, 1, 2, 3, 3]])
  np.testing.assert_array_equal(split.positions_BT, [[0, 1, 0, 1, 2, 3, 0, 0, 1]])
  assert documents.split(jnp.asarray(tokens), START, restart_positions=False).positions_BT is None


def _documents_alone(cfg, params, inputs_BT, targets_BT) -> np.ndarray:
  """Each row's per-position losses, each document run through the model as a sequence of its
  own: one row per document, from position 0, padded after its end (which causal attention never
  lets it see)."""
  pieces = []  # (row, start, end)
  for b, row in enumerate(inputs_BT):
    bounds = [0, *[t for t in range(1, len(row)) if row[t] == START], len(row)]
    pieces += [(b, start, end) for start, end in zip(bounds[:-1], bounds[1:])]
  alone_inputs, alone_targets = (np.zeros((len(pieces), inputs_BT.shape[1]), np.int32) for _ in range(2))
  for i, (b, start, end) in enumerate(pieces):
    alone_inputs[i, :end - start], alone_targets[i, :end - start] = inputs_BT[b, start:end], targets_BT[b, start:end]
  alone = jax.jit(lambda p, x, y: model_lib.bind(cfg, p).nll(x, y))(params, alone_inputs, alone_targets)
  nll = np.zeros(inputs_BT.shape, np.float32)
  for i, (b, start, end) in enumerate(pieces):
    nll[b, start:end] = alone[i, :end - start]
  return nll


@pytest.mark.parametrize("family, kernel, restart", [
    ("gpt2", "blocked", True), ("gpt2", "xla", True), ("llama", "blocked", True), ("llama", "xla", True),
    ("llama", "blocked", False),  # rotary scores depend on relative positions only: no restart needed
])
def test_a_packed_windows_loss_is_the_sum_of_its_documents_alone(family, kernel, restart):
  cfg = dataclasses.replace(GPT2 if family == "gpt2" else LLAMA, attention=kernel)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = _windows(4, cfg.block_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  split = documents.split(jnp.asarray(inputs), START, restart_positions=restart)
  packed = jax.jit(lambda p, x, y, d: model_lib.bind(cfg, p).nll(x, y, documents=d))(params, inputs, targets, split)
  alone = _documents_alone(cfg, params, inputs, targets)
  np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed.sum(), alone.sum(), rtol=1e-5)
  unmasked = model_lib.bind(cfg, params).nll(inputs, targets)
  assert np.abs(np.asarray(unmasked) - alone).max() > 1e-2  # across documents, the loss differs


def test_masked_gradients_equal_across_kernels_and_on_a_mesh():
  """blocked, XLA and splash (interpreted) agree on the loss and gradients of a masked Llama,
  on an 8-device mesh with heads split over tensor."""
  cfg = dataclasses.replace(LLAMA, block_size=128)
  params = model_lib.init_params(cfg, jax.random.key(1))
  tokens = _windows(8, cfg.block_size, seed=1)
  split = documents.split(jnp.asarray(tokens[:, :-1]), START, restart_positions=True)
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])

  def loss_and_grads(kernel):
    c = dataclasses.replace(cfg, attention=kernel)
    loss = lambda p: model_lib.bind(c, p).nll(tokens[:, :-1], tokens[:, 1:], documents=split).mean()  # noqa: E731
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(loss))(params)

  expected_loss, expected_grads = loss_and_grads("blocked")
  for kernel in ("xla", "splash"):
    loss, grads = loss_and_grads(kernel)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), grads, expected_grads)


@pytest.mark.parametrize("platform, calls", [
    ("cuda", {"__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"}),  # the mask as cuDNN's bias
    ("tpu", {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
             "splash_mha_dkv_segmented_no_residuals"}),  # splash's segment ids
])
def test_the_masked_step_lowers_with_the_fused_kernels_segment_inputs(tmp_path, platform, calls):
  cfg = config_lib.load_config("llama3_2_1b", [
      "model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.n_kv_head=2", "model.head_dim=32",
      "model.mlp_hidden=256", "model.block_size=128", "model.vocab_size=1000", "train.batch_size=8",
      "train.device_batch_size=0", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  lowered = lower.lower(cfg, platform, jax.devices()[:8], str(tmp_path), partition=False, document_start=START)
  train = lowered["texts"]["train_step"]
  assert set(lower.custom_calls(train)) == calls
  assert lower.square_softmaxes(train, 128) == 0


def test_the_document_start_token_by_tokenizer_and_setting():
  auto = config_lib.DataConfig()
  gpt2, char = tokenizer_lib.GPT2Tokenizer(), tokenizer_lib.CharTokenizer("ab")
  assert data.document_start(auto, gpt2) == tokenizer_lib.GPT2_EOT_ID
  assert data.document_start(auto, char) is None
  assert data.document_start(dataclasses.replace(auto, document_mask="false"), gpt2) is None
  with pytest.raises(UserError, match="data.document_mask=true needs a tokenizer that marks documents"):
    data.document_start(dataclasses.replace(auto, document_mask="true"), char)
  with pytest.raises(UserError, match="data.document_positions=true needs the document mask"):
    data.document_start(dataclasses.replace(auto, document_mask="false", document_positions=True), gpt2)


def test_a_run_on_documents_says_it_masks_and_aligns_them(tmp_path, capsys):
  from conftest import tiny_config  # noqa: PLC0415
  from gptjax import prepare, sources, train  # noqa: PLC0415
  text = sources.read_text(sources.BUILTIN_SHAKESPEARE)
  (tmp_path / "docs").mkdir()
  for i in range(12):  # twelve documents of 2,000 characters
    (tmp_path / "docs" / f"{i:02d}.txt").write_text(text[i * 2000:(i + 1) * 2000])
  prepare.prepare(str(tmp_path / "docs"), "gpt2", str(tmp_path / "data"))
  cfg = tiny_config(tmp_path, f"data.dir={tmp_path / 'data'}", "data.align=document", "data.document_positions=true",
                    "train.max_iters=4", "train.eval_interval=4", "train.checkpoint_interval=4", "train.log_interval=2")
  result, _ = train.train(cfg, progress_bar=False, devices=jax.devices()[:1])
  assert result["step"] == 4 and np.isfinite(result["val_loss"])
  out = capsys.readouterr().out
  assert "documents: masked, each opened by token 50256 ('<|endoftext|>'), positions counted from each document's start" in out
  assert "(data.order=shuffled), each moved to the first document start in its block (data.align=document)" in out
