"""The schedules against their formulas, Muon against optax's reference on each matrix (and AdamW
on everything else), Lion and Adafactor training, optimizer state sharded like the parameters,
z-loss against its formula, the soft cap, and the per-layer-group norms."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

from gptjax import config as config_lib
from gptjax import metrics
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax import steps as steps_lib

PEAK, FLOOR, WARMUP, END = 2e-3, 2e-4, 100, 1000
LLAMA = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.n_kv_head=2", "model.mlp_hidden=96",
         "model.vocab_size=77", "model.block_size=16"]


def _optim(*overrides) -> config_lib.OptimConfig:
  return config_lib.load_config(None, [f"optim.learning_rate={PEAK}", f"optim.min_lr={FLOOR}",
                                       f"optim.warmup_iters={WARMUP}", f"optim.lr_decay_iters={END}", *overrides]).optim


@pytest.mark.parametrize("shape, left", [
    ("linear", lambda p: 1 - p), ("sqrt", lambda p: 1 - math.sqrt(p)), ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p)))])
def test_wsd_equals_its_formula_at_the_boundaries_and_between(shape, left):
  cfg = _optim("optim.schedule=wsd", "optim.decay_fraction=0.2", f"optim.decay_shape={shape}")
  schedule = optim.lr_schedule(cfg)
  start = optim.wsd_decay_start(cfg)
  assert start == 800
  expected = {0: 0.0, 50: PEAK / 2, WARMUP: PEAK, 500: PEAK, start: PEAK, END: FLOOR, END + 500: FLOOR}
  expected |= {start + d: FLOOR + (PEAK - FLOOR) * left(d / (END - start)) for d in (1, 50, 100, 199)}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")


def test_cosine_linear_and_constant_schedules():
  cosine, linear, constant = (optim.lr_schedule(_optim(f"optim.schedule={s}")) for s in ("cosine", "linear", "constant"))
  for step in (0, 50, WARMUP, 400, END, 2 * END):
    done = min(max(step - WARMUP, 0) / (END - WARMUP), 1.0)
    warming = step < WARMUP
    expected = {cosine: FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * done)),
                linear: FLOOR + (PEAK - FLOOR) * (1 - done), constant: PEAK}
    for schedule, lr in expected.items():
      np.testing.assert_allclose(float(schedule(step)), PEAK * step / WARMUP if warming else lr, rtol=1e-6, atol=1e-12)


def test_muon_takes_the_hidden_matrices_by_their_axes_and_leaves_the_rest_to_adamw():
  model = config_lib.load_config("llama_shakespeare_cpu", LLAMA).model
  _, names = model_lib.abstract_params(model)
  dims = jax.tree.map(optim.muon_dimensions, names, is_leaf=lambda x: isinstance(x, tuple))
  flat = {jax.tree_util.keystr(path): d for path, d in jax.tree_util.tree_flatten_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(x, contrib.MuonDimensionNumbers))[0]}
  D = contrib.MuonDimensionNumbers
  assert flat == {  # [layers, embed, heads, kv] and so on: embed in, or embed out
      "['h']['attn']['q_attn']['kernel']": D((1,), (2, 3)), "['h']['attn']['kv_attn']['kernel']": D((1,), (3, 4)),
      "['h']['attn']['c_proj']['kernel']": D((1, 2), (3,)), "['h']['mlp']['c_fc']['kernel']": D((1,), (3,)),
      "['h']['mlp']['c_proj']['kernel']": D((1,), (2,)), "['h']['ln_1']['scale']": None, "['h']['ln_2']['scale']": None,
      "['lm_head']['kernel']": None, "['ln_f']['scale']": None, "['wte']['embedding']": None}


def _one_update(tx, params, grads):
  state = tx.init(params)
  for _ in range(2):  # the second update has momentum and moments to use
    updates, state = tx.update(grads, state, params)
  return updates


def test_muon_updates_equal_optax_per_matrix_and_adamw_per_leaf():
  """Each [embed, heads * kv] matrix of the fused query/key/value kernel, for each layer and each of
  q, k, v, gets what optax's Muon gives that matrix alone; every other leaf gets optax's AdamW's."""
  cfg = config_lib.load_config("shakespeare_char_cpu", ["model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                                                        "model.vocab_size=77", "optim.name=muon", "optim.grad_clip=0",
                                                        "optim.warmup_iters=0", "optim.lr_decay_iters=10"])
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  updates = _one_update(optim.make_optimizer(cfg.optim, cfg.model), params, grads)
  o, schedule = cfg.optim, optim.lr_schedule(cfg.optim)

  reference = contrib.muon(schedule, beta=o.muon_momentum, weight_decay=o.weight_decay, consistent_rms=o.muon_rms)
  kernel, grad = params["h"]["attn"]["c_attn"]["kernel"], grads["h"]["attn"]["c_attn"]["kernel"]  # [L, D, 3, H, K]
  L, D, _, H, K = kernel.shape
  for layer in range(L):
    for qkv in range(3):
      matrix = lambda x: x[layer, :, qkv].reshape(D, H * K)  # noqa: E731
      expected = _one_update(reference, matrix(kernel), matrix(grad))
      np.testing.assert_allclose(matrix(updates["h"]["attn"]["c_attn"]["kernel"]), expected, rtol=2e-5, atol=1e-8)

  adamw = optax.adamw(schedule, b1=o.beta1, b2=o.beta2, weight_decay=o.weight_decay, mask=optim.decay_mask)
  expected = _one_update(adamw, params, grads)
  muon_leaves = {"['h']['attn']['c_attn']['kernel']", "['h']['attn']['c_proj']['kernel']",
                 "['h']['mlp']['c_fc']['kernel']", "['h']['mlp']['c_proj']['kernel']"}
  checked = 0
  for (path, actual), want in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(expected)):
    if jax.tree_util.keystr(path) not in muon_leaves:  # embeddings, positions, norms, biases
      np.testing.assert_allclose(actual, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
      checked += 1
  assert checked == len(jax.tree.leaves(params)) - 4


def _short_run(cfg: config_lib.Config, mesh, n_steps: int = 6):
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
  steps = steps_lib.compile_steps(cfg, tx, schedule, mesh)
  state = steps_lib.init_state(cfg.model, tx, steps.shardings, 0)
  tokens = np.random.default_rng(0).integers(0, 8, (1, cfg.train.batch_size, cfg.model.block_size + 1)).astype(np.int32)
  losses = []
  for _ in range(n_steps):
    state, step_metrics = steps.train(state, *(sharding.put_batch(a, mesh) for a in (tokens[..., :-1], tokens[..., 1:])))
    losses.append(float(step_metrics["loss"]))
  return steps, state, losses, jax.device_get(step_metrics)


@pytest.mark.parametrize("name", ["muon", "lion", "adafactor"])
def test_each_optimizer_trains_with_its_state_split_like_the_parameters(name):
  """On an FSDP mesh of 8: the loss on a repeated batch falls; every state leaf of a parameter's
  shape has that parameter's sharding (Adafactor's factored ones are replicated)."""
  cfg = config_lib.load_config("llama_shakespeare_cpu", [
      *LLAMA, f"optim.name={name}", "optim.warmup_iters=0", "optim.learning_rate=1e-2", "optim.lr_decay_iters=100",
      "mesh.fsdp=8", "mesh.data=1", "train.batch_size=8"])
  mesh = sharding.make_mesh(cfg.mesh)
  steps, state, losses, logged = _short_run(cfg, mesh)
  assert losses[-1] < losses[0] - 0.1, losses
  assert "z_loss" not in logged  # logged only where optim.z_loss is set (test_z_loss_...)
  params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  split = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    key = next((k for k in params if jax.tree_util.keystr(path).endswith(k)), None)
    if key is not None and leaf.shape == params[key].shape:
      assert leaf.sharding == params[key].sharding, jax.tree_util.keystr(path)
      split += not leaf.sharding.is_fully_replicated
    else:
      assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
  assert split > 0


def test_z_loss_equals_its_formula_and_is_logged_apart():
  cfg = config_lib.load_config("llama_shakespeare_cpu", [*LLAMA, "optim.z_loss=1e-2", "model.loss_chunk=8"])
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  tokens, targets = np.random.default_rng(0).integers(0, 77, (2, 3, 16))
  logits = jax.jit(lambda params, tokens: model_lib.bind(cfg.model, params)(tokens))(params, tokens)  # eager: slow
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  z_square = jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean()
  nll_BT, log_partition_BT, _ = jax.jit(lambda params: model_lib.bind(cfg.model, params).losses(tokens, targets))(params)
  np.testing.assert_allclose(nll_BT.mean(), nll, rtol=1e-5)
  np.testing.assert_allclose(jnp.square(log_partition_BT).mean(), z_square, rtol=1e-5)

  mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=1), jax.devices()[:1])
  _, _, _, logged = _short_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2)), mesh, 1)
  assert "z_loss" in logged  # (and not without it: test_each_optimizer_trains_...)
  tokens = np.random.default_rng(0).integers(0, 8, (2, 17))  # _short_run's batch
  logits = jax.jit(lambda params: model_lib.bind(cfg.model, params)(tokens[:, :-1]))(
      model_lib.init_params(cfg.model, jax.random.key(0)))
  np.testing.assert_allclose(logged["z_loss"], 1e-2 * jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean(), rtol=1e-4)


def test_the_soft_cap_bounds_the_logits_everywhere_it_is_used():
  cap = 2.0
  cfg = config_lib.load_config("llama_shakespeare_cpu", [*LLAMA, f"model.logit_softcap={cap}", "model.loss_chunk=8"]).model
  params = model_lib.init_params(cfg, jax.random.key(0))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 300  # uncapped logits reach far past the cap
  tokens, targets = np.random.default_rng(0).integers(0, 77, (2, 2, 16))
  uncapped = model_lib.bind(dataclasses.replace(cfg, logit_softcap=0.0), params)(tokens)
  logits = model_lib.bind(cfg, params)(tokens)
  assert float(jnp.abs(uncapped).max()) > 10 * cap and float(jnp.abs(logits).max()) <= cap
  np.testing.assert_allclose(logits, cap * jnp.tanh(uncapped / cap), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model_lib.bind(cfg, params).nll(tokens, targets),
                             optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-5)
  cached_B1V, _ = jax.jit(lambda params, tokens: model_lib.bind(cfg, params).prefill(tokens, 16))(params, tokens)
  np.testing.assert_allclose(cached_B1V, logits[:, -1], rtol=1e-4, atol=1e-5)  # sampling's path


def test_norms_by_group_cover_the_whole_tree():
  cfg = config_lib.load_config("llama_shakespeare_cpu", LLAMA).model
  params = model_lib.init_params(cfg, jax.random.key(0))
  norms = metrics.norms_by_group(params)
  assert sorted(norms) == ["layer_0", "layer_1", "lm_head", "ln_f", "wte"]
  np.testing.assert_allclose(sum(float(n) ** 2 for n in norms.values()), float(optax.tree.norm(params)) ** 2, rtol=1e-5)
  layer_1 = sum(float(jnp.sum(jnp.square(x[1]))) for x in jax.tree.leaves(params["h"]))
  np.testing.assert_allclose(float(norms["layer_1"]) ** 2, layer_1, rtol=1e-5)


def test_norms_by_group_number_dense_layers_among_sparse_ones_in_the_models_order():
  cfg = config_lib.load_config("llama_shakespeare_cpu", [*LLAMA[1:], "model.n_layer=3", "model.n_experts=4",
                                                         "model.dense_layers=[1]"]).model
  params = model_lib.init_params(cfg, jax.random.key(0))
  norms = metrics.norms_by_group(params, cfg.layer_stacks())
  assert sorted(norms) == ["layer_0", "layer_1", "layer_2", "lm_head", "ln_f", "wte"]
  np.testing.assert_allclose(sum(float(n) ** 2 for n in norms.values()), float(optax.tree.norm(params)) ** 2, rtol=1e-5)
  dense = sum(float(jnp.sum(jnp.square(x[0]))) for x in jax.tree.leaves(params["h_dense"]))
  sparse = sum(float(jnp.sum(jnp.square(x[1]))) for x in jax.tree.leaves(params["h"]))  # layer 2: h's second
  np.testing.assert_allclose([float(norms["layer_1"]) ** 2, float(norms["layer_2"]) ** 2], [dense, sparse], rtol=1e-5)
  with pytest.raises(ValueError, match="needs their places"):
    metrics.norms_by_group(params)
