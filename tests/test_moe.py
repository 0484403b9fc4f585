"""The mixture-of-experts MLP: routed output and gradients against a plain loop over each token's
chosen experts, the router losses against their formulas (and transformers' Mixtral loss), the
cached decoding of an MoE model, and a short training run that logs the router's losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax import train
from gptjax.model import moe

from conftest import run_cli, tiny, tiny_config

MOE = config_lib.ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16, bias=False, norm="rmsnorm",
                             positions="rope", mlp="swiglu", tie_embeddings=False, n_experts=4, experts_per_token=2,
                             expert_hidden=12)


def _per_token_loop(layer: moe.MoE, x_BTD):
  """y[n] = sum over token n's k likeliest experts e of w_e * proj_e(act(x[n] fc_e)), one token
  and one expert at a time; w the router's probabilities of the k (renormalised where asked)."""
  cfg = layer.cfg
  x_ND = x_BTD.reshape(-1, cfg.n_embd)
  probs_NE = jax.nn.softmax(x_ND @ layer.router.kernel[...], axis=-1)
  outputs = []
  for n in range(x_ND.shape[0]):
    chosen = jnp.argsort(-jax.lax.stop_gradient(probs_NE[n]), stable=True)[:cfg.experts_per_token]
    weights = probs_NE[n, chosen]
    weights = weights / weights.sum() if cfg.moe_norm_topk else weights
    y_D = jnp.zeros(cfg.n_embd)
    for i in range(cfg.experts_per_token):
      e, w = chosen[i], weights[i]
      h = x_ND[n] @ layer.c_fc.kernel[...][e].reshape(cfg.n_embd, -1)
      if cfg.mlp == "swiglu":
        gate, up = jnp.split(h, 2)
        h = jax.nn.silu(gate) * up
      else:
        h = jax.nn.gelu(h, approximate=True)
      y_D = y_D + w * (h @ layer.c_proj.kernel[...][e])
    outputs.append(y_D)
  y_BTD = jnp.stack(outputs).reshape(x_BTD.shape)
  return y_BTD + layer.shared(x_BTD, None) if cfg.shared_expert_hidden else y_BTD


@pytest.mark.parametrize("overrides", [{}, {"mlp": "gelu", "moe_norm_topk": False},
                                       {"shared_expert_hidden": 8, "experts_per_token": 3},
                                       {"moe_matmul": "ragged_dot"}])
def test_routed_experts_equal_a_loop_over_each_tokens_choices(overrides):
  cfg = dataclasses.replace(MOE, **overrides)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 5, cfg.n_embd))
  cotangent = jax.random.normal(jax.random.key(2), x_BTD.shape)
  graphdef, params = nnx.split(layer)

  def weighted(run, params, x_BTD):
    return jnp.sum(run(nnx.merge(graphdef, params), x_BTD) * cotangent)

  def routed(layer, x_BTD):
    return layer(x_BTD, None)[0]

  np.testing.assert_allclose(routed(layer, x_BTD), _per_token_loop(layer, x_BTD), rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(weighted, argnums=(1, 2)), static_argnums=0)(routed, params, x_BTD)
  expected = jax.jit(jax.grad(weighted, argnums=(1, 2)), static_argnums=0)(_per_token_loop, params, x_BTD)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _activation(h_MF):  # SwiGLU on [M, 2F]
  return moe.mlp.activate(h_MF.reshape(h_MF.shape[0], 2, -1), True)


@pytest.mark.parametrize("tokens, k, experts, first", [(5, 2, 3, 0), (150, 2, 5, 0), (7, 1, 4, 0), (3, 3, 8, 0),
                                                        (20, 2, 4, 2), (9, 2, 3, 7)])  # first: other devices' experts
def test_the_tiled_kernel_equals_ragged_dots(tokens, k, experts, first):
  """Values and gradients, with empty experts, and choices of experts outside this device's
  [0, E) (numbered from `first` on another device) that neither kernel computes."""
  x_ND = jax.random.normal(jax.random.key(0), (tokens, 6))
  experts_NK = jax.vmap(lambda key: jax.random.choice(key, 10, (k,), replace=False))(
      jax.random.split(jax.random.key(1), tokens)) % (experts + first) - first  # some below 0 where first > 0
  weights_NK = jax.random.uniform(jax.random.key(2), (tokens, k))
  fc_EDF, proj_EFD = jax.random.normal(jax.random.key(3), (experts, 6, 10)), jax.random.normal(jax.random.key(4), (experts, 5, 6))
  cotangent = jax.random.normal(jax.random.key(5), (tokens, 6))

  def weighted(kernel, x_ND, weights_NK, fc_EDF, proj_EFD):
    return jnp.sum(kernel(x_ND, experts_NK, weights_NK, fc_EDF, proj_EFD, _activation) * cotangent)

  gradient = jax.jit(jax.value_and_grad(weighted, argnums=(1, 2, 3, 4)), static_argnums=0)
  (tiled, tiled_grads), (ragged, ragged_grads) = (gradient(kernel, x_ND, weights_NK, fc_EDF, proj_EFD)
                                                  for kernel in (moe.tiled_experts, moe.ragged_experts))
  np.testing.assert_allclose(tiled, ragged, rtol=1e-5)
  for got, want in zip(tiled_grads, ragged_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_tiled_kernel_computes_only_the_chosen_rows():
  """XLA's FLOPs for 768 tokens' 1,536 choices among 8 experts: ragged_dot on a CPU computes every
  row for every expert (8x); the tiles at most the rows plus a tile per expert."""
  tokens, k, experts, D, F = 768, 2, 8, 128, 192
  x_ND, weights_NK = jnp.ones((tokens, D)), jnp.ones((tokens, k))
  experts_NK = jnp.stack([jnp.arange(tokens) % 3, 3 + jnp.arange(tokens) % 5], axis=1)  # uneven: 256 down to 153
  fc_EDF, proj_EFD = jnp.ones((experts, D, 2 * F)), jnp.ones((experts, F, D))
  needed = 2 * tokens * k * (D * 2 * F + F * D)

  def flops(kernel):
    run = jax.jit(lambda *args: kernel(*args, _activation))
    analysis = run.lower(x_ND, experts_NK, weights_NK, fc_EDF, proj_EFD).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

  assert flops(moe.ragged_experts) >= 7 * needed
  assert flops(moe.tiled_experts) <= (tokens * k + experts * moe.TILE) / (tokens * k) * needed * 1.05


def test_the_load_balancing_loss_on_a_hand_made_case():
  probs_NE = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.5, 0.1, 0.1, 0.3]])
  experts_NK = jnp.array([[0, 1], [0, 1], [0, 2], [0, 3]])
  # f = the share of the 8 choices per expert = (4, 2, 1, 1) / 8; P = the mean probabilities
  # = (0.45, 0.2, 0.2, 0.15); E * sum f * P = 4 * (0.225 + 0.05 + 0.025 + 0.01875).
  np.testing.assert_allclose(moe.load_balancing_loss(probs_NE, experts_NK), 1.275, rtol=1e-6)
  uniform = jnp.full((4, 4), 0.25)
  np.testing.assert_allclose(moe.load_balancing_loss(uniform, jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]])), 1.0)
  collapsed = jax.nn.one_hot(jnp.zeros(4, jnp.int32), 4)  # every token on expert 0
  np.testing.assert_allclose(moe.load_balancing_loss(collapsed, jnp.zeros((4, 1), jnp.int32)), 4.0)


def test_the_load_balancing_loss_is_mixtrals_over_k():
  """transformers' Mixtral loss (one layer, no padding) sums over the k choices without dividing by k."""
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  logits_NE = jax.random.normal(jax.random.key(0), (24, 8))
  probs_NE, _, experts_NK = moe.route(logits_NE, 2, norm_topk=True)
  theirs = load_balancing_loss_func((torch.tensor(np.asarray(logits_NE)),), num_experts=8, top_k=2)
  np.testing.assert_allclose(2 * moe.load_balancing_loss(probs_NE, experts_NK), theirs.item(), rtol=1e-5)


def test_the_router_z_loss_is_the_mean_squared_log_partition():
  logits_NE = jax.random.normal(jax.random.key(0), (6, 4)) * 3
  expected = np.mean(np.log(np.exp(np.asarray(logits_NE, np.float64)).sum(-1)) ** 2)
  np.testing.assert_allclose(moe.router_z_loss(logits_NE), expected, rtol=1e-5)


def test_route_renormalises_the_chosen_weights_only_when_asked():
  logits_NE = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  _, weights, experts = moe.route(logits_NE, 2, norm_topk=True)
  np.testing.assert_allclose(weights, [[0.625, 0.375]], rtol=1e-6)
  assert experts.tolist() == [[0, 1]]
  np.testing.assert_allclose(moe.route(logits_NE, 2, norm_topk=False)[1], [[0.5, 0.3]], rtol=1e-6)


def test_an_moe_model_decodes_with_its_cache_as_its_full_forward():
  cfg = dataclasses.replace(MOE, shared_expert_hidden=8)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, cfg.block_size), 0, cfg.vocab_size)
  logits = jax.jit(lambda params: model_lib.bind(cfg, params)(tokens))(params)
  prefill = jax.jit(lambda params, prompt: model_lib.bind(cfg, params).prefill(prompt, cfg.block_size))
  decode = jax.jit(lambda params, token, cache: model_lib.bind(cfg, params).decode(token, cache))
  next_logits, cache = prefill(params, tokens[:, :6])
  np.testing.assert_allclose(next_logits, logits[:, 5], rtol=1e-5, atol=1e-5)
  for t in range(6, cfg.block_size):
    next_logits, cache = decode(params, tokens[:, t:t + 1], cache)
    np.testing.assert_allclose(next_logits, logits[:, t], rtol=1e-5, atol=1e-5)


def test_an_moe_run_trains_logs_its_router_losses_and_explains_its_routing(char_data, tmp_path):
  moe_model = ["model.n_experts=4", "model.experts_per_token=2", "model.expert_hidden=32", "model.mlp=swiglu"]
  result = run_cli("train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.out_dir={tmp_path}",
                                                            *moe_model, "train.max_iters=20", "train.log_interval=10"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "M active per token)" in result.stdout.splitlines()[0]
  assert "experts: 4 of 32 (2 per token), 4 per device over mesh.expert=1; grouped matmuls: tiled (auto on cpu)" \
      in result.stdout.splitlines()
  lines = [line for line in result.stdout.splitlines() if line.startswith("step ") and "router balance" in line]
  assert len(lines) == 2, result.stdout
  balance = float(lines[-1].split("router balance ")[1].split(",")[0])
  assert 1.0 <= balance < 4.0  # 1 when the 4 experts share the choices evenly, 4 when one takes all

  explained = run_cli("explain", "--checkpoint", tmp_path, "--layers", "0")
  assert explained.returncode == 0, explained.stderr[-2000:]
  assert "E=4 (k=2)" in explained.stdout
  for stage, shape in [("router_probs", "E=4]"), ("chosen_experts", "k=2]"), ("experts", "D=32]")]:
    assert any(line.split()[:1] == [stage] and shape in line for line in explained.stdout.splitlines()), stage


def test_each_expert_is_a_matrix_of_its_own_for_muon_and_decayed_by_adamw():
  _, names = model_lib.abstract_params(MOE)
  mlp = names["h"]["mlp"]
  assert optim.muon_dimensions(mlp["c_fc"]["kernel"]) == optax.contrib.MuonDimensionNumbers((2,), (4,))
  assert optim.muon_dimensions(mlp["c_proj"]["kernel"]) == optax.contrib.MuonDimensionNumbers((2,), (3,))
  assert optim.muon_dimensions(mlp["router"]["kernel"]) is None  # [layers, embed, experts]: AdamW's
  decayed = optim.decay_mask(model_lib.abstract_params(MOE)[0])["h"]["mlp"]
  assert decayed["c_fc"]["kernel"] and decayed["c_proj"]["kernel"] and decayed["router"]["kernel"]


def test_the_named_mixtures_have_their_published_sizes():
  """Qwen3-30B-A3B: 30.5B parameters, 3.3B active; moe_shakespeare_cpu about llama_shakespeare_cpu's active size."""
  big = config_lib.load_config("qwen3_30b_a3b").model
  assert model_lib.count_params(model_lib.abstract_params(big)[0]) == 30_532_122_624
  assert model_lib.active_params(big) == 3_353_032_704
  small, dense = (config_lib.load_config(name, ["model.vocab_size=65"]).model
                  for name in ("moe_shakespeare_cpu", "llama_shakespeare_cpu"))
  assert abs(model_lib.active_params(small) / model_lib.count_params(model_lib.abstract_params(dense)[0]) - 1) < 0.01


def test_expert_parallel_with_ragged_dot_equals_one_device_in_values_and_gradients():
  """The accelerators' kernel (the runs below use the CPU's tiled one): the loss and gradients of a
  model with a dense layer on meshes of 8 with the experts split 4 (with tensor) and 2 (with fsdp
  and data) ways, against no mesh. Each device's rows of other devices' experts are in no group."""
  cfg = dataclasses.replace(MOE, n_experts=8, moe_matmul="ragged_dot", dense_layers=(0,))
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, cfg.block_size), 0, cfg.vocab_size)

  def loss(params, tokens):
    nll_BT, _, router = model_lib.bind(cfg, params).losses(tokens, jnp.roll(tokens, -1, axis=1))
    return nll_BT.mean() + router["router_balance"]

  gradient = jax.jit(jax.value_and_grad(loss))
  expected_loss, expected_grads = gradient(params, tokens)
  shapes, names = model_lib.abstract_params(cfg)
  for axes in [dict(data=1, expert=4, tensor=2), dict(data=2, fsdp=2, expert=2)]:
    mesh = sharding.make_mesh(config_lib.MeshConfig(**axes))
    placed = jax.device_put(params, sharding.param_shardings(shapes, names, mesh))
    with jax.set_mesh(mesh):
      got_loss, got_grads = gradient(placed, jax.device_put(tokens, sharding.rows_sharding(mesh)))
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


MESH_MOE = ["model.n_experts=8", "model.experts_per_token=2", "model.expert_hidden=32", "model.mlp=swiglu",
            "model.n_head=8", "train.max_iters=4", "train.eval_interval=4", "train.checkpoint_interval=4",
            "train.batch_size=16", "train.grad_accum_steps=2"]


@pytest.fixture(scope="module")
def one_device_moe_run(tmp_path_factory, char_data):
  return train.train(tiny_config(tmp_path_factory.mktemp("one"), f"data.dir={char_data}", *MESH_MOE),
                     progress_bar=False, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [("mesh.data=1", "mesh.expert=8"),
                                  pytest.param(("mesh.data=2", "mesh.expert=4"), marks=pytest.mark.slow),  # the suite's time
                                  ("mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"),
                                  pytest.param(("mesh.data=1", "mesh.expert=4", "mesh.tensor=2"), marks=pytest.mark.slow)])
# expert 4 x tensor 2 in the default run: lowered (test_lower), and values and gradients with ragged_dot above
def test_an_moe_run_on_a_mesh_of_8_matches_one_device(tmp_path, char_data, one_device_moe_run, mesh):
  """Expert parallelism with data, FSDP or tensor parallelism: the experts' weights split over
  expert (and fsdp over embed, tensor over their hidden size), the tokens all-gathered and
  reduce-scattered within each expert group; the same losses and parameters as one device."""
  result, state = train.train(tiny_config(tmp_path, f"data.dir={char_data}", *MESH_MOE, *mesh),
                              progress_bar=False, devices=None)
  reference, reference_state = one_device_moe_run
  assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5),
               jax.device_get(state.params), jax.device_get(reference_state.params))
  sizes = dict(item.removeprefix("mesh.").split("=") for item in mesh)
  expected = P(None, "expert", "fsdp" if "fsdp" in sizes else None, None, "tensor" if "tensor" in sizes else None)
  fc = state.params["h"]["mlp"]["c_fc"]["kernel"]  # [layers, experts, embed, 2, hidden]
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == fc.shape]
  assert len(moments) == 2  # AdamW's, placed as the parameter
  for kernel in (fc, *moments):
    assert kernel.sharding.is_equivalent_to(NamedSharding(kernel.sharding.mesh, expected), kernel.ndim)
