"""The attention kernels: which one `auto` chooses where, the refusals, and the kernels that run
here (splash in Pallas' interpret mode, on an 8-device mesh) against `blocked`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import model as model_lib
from gptjax import sharding
from gptjax.config import MeshConfig, ModelConfig
from gptjax.errors import UserError
from gptjax.model import kernels

GPT2 = ModelConfig(vocab_size=96, block_size=128, n_layer=2, n_head=4, n_embd=64)
LLAMA = dataclasses.replace(GPT2, n_kv_head=2, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                            tie_embeddings=False)


@pytest.mark.parametrize("platform,changes,kernel,why", [
    ("cpu", {}, "blocked", "auto on cpu"),
    ("cuda", {}, "cudnn", "auto on cuda"),
    ("cuda", {"dtype": "float32"}, "xla", "takes bfloat16 or float16, not float32 (set model.dtype=bfloat16)"),
    ("cuda", {"n_embd": 48, "n_head": 4}, "xla", "a multiple of 8 up to 128, not 12"),
    ("cuda", {"head_dim": 192}, "xla", "a multiple of 8 up to 128, not 192"),
    ("tpu", {}, "splash", "auto on tpu"),
    ("tpu", {"block_size": 96}, "xla", "a multiple of 128, not 96"),
    ("rocm", {}, "xla", "auto on rocm"),
    ("cpu", {"attention": "splash"}, "splash", "interpret mode"),
    ("cuda", {"attention": "xla"}, "xla", "model.attention=xla"),
])
def test_auto_chooses_the_fused_kernel_where_it_applies_and_says_why_not(platform, changes, kernel, why):
  cfg = dataclasses.replace(GPT2, **changes)
  choice = kernels.choose(cfg, cfg.block_size, platform)
  assert choice.kernel == kernel and why in choice.why, choice


@pytest.mark.parametrize("platform,changes,message", [
    ("cuda", {"attention": "cudnn", "dtype": "float32"}, "set model.dtype=bfloat16"),
    ("cpu", {"attention": "cudnn"}, "needs an NVIDIA GPU, and this runs on cpu"),
    ("cuda", {"attention": "splash"}, "splash attention is a TPU kernel, and this runs on cuda"),
    ("tpu", {"attention": "splash", "block_size": 64}, "a sequence length that is a multiple of 128, not 64"),
])
def test_an_explicit_kernel_that_cannot_run_is_one_line(platform, changes, message):
  cfg = dataclasses.replace(GPT2, **changes)
  with pytest.raises(UserError, match=f"model.attention={cfg.attention} cannot run here: .*{message}"):
    kernels.choose(cfg, cfg.block_size, platform)


def test_a_prompt_of_another_length_falls_back_to_autos_choice():
  cfg = dataclasses.replace(GPT2, attention="splash")
  choice = kernels.choose(cfg, 7, "tpu", strict=False)
  assert choice.kernel == "xla" and "cannot run at length 7" in choice.why


def _qkv(B, T, H, G, K, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(key, (B, T, heads, K), dtype) for key, heads in zip(keys, (H, G, G)))


@pytest.mark.parametrize("mesh_shape,heads,kv_heads,dtype,tolerance", [
    ((2, 2, 2), 4, 2, jnp.float32, 2e-5),  # heads split over tensor
    ((4, 1, 2), 4, 1, jnp.float32, 2e-5),  # one key/value head: tensor cannot split it, nor so the queries
    ((2, 4, 1), 4, 4, jnp.bfloat16, 3e-2),
])
def test_splash_attention_on_a_mesh_computes_what_blocked_computes(mesh_shape, heads, kv_heads, dtype, tolerance):
  mesh = sharding.make_mesh(MeshConfig(*mesh_shape), jax.devices()[:8])
  cfg = dataclasses.replace(GPT2, n_head=heads, n_kv_head=kv_heads, dtype=jnp.dtype(dtype).name)
  q, k, v = _qkv(8, 128, heads, kv_heads, 16, dtype)
  q, k, v = jax.device_put((q, k, v), NamedSharding(mesh, P(("data", "fsdp"))))

  def loss_and_grads(kernel):
    c = dataclasses.replace(cfg, attention=kernel)
    def loss(q, k, v):
      y = kernels.causal_attention(q, k, v, c)
      return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  with jax.set_mesh(mesh):
    ((_, y_splash), grads_splash), ((_, y_blocked), grads_blocked) = loss_and_grads("splash"), loss_and_grads("blocked")
  for splash_value, blocked_value in zip((y_splash, *grads_splash), (y_blocked, *grads_blocked)):
    np.testing.assert_allclose(np.asarray(splash_value, np.float32), np.asarray(blocked_value, np.float32),
                               atol=tolerance * 10, rtol=tolerance)


def test_a_llama_model_with_splash_attention_trains_like_blocked():
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
  params = model_lib.init_params(LLAMA, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (8, LLAMA.block_size), 0, LLAMA.vocab_size)

  def loss_and_grads(kernel):
    cfg = dataclasses.replace(LLAMA, attention=kernel)
    loss = lambda p: jnp.mean(model_lib.bind(cfg, p)(tokens) ** 2)  # noqa: E731
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(loss))(params)

  (splash_loss, splash_grads), (blocked_loss, blocked_grads) = loss_and_grads("splash"), loss_and_grads("blocked")
  np.testing.assert_allclose(splash_loss, blocked_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), splash_grads, blocked_grads)


def test_report_names_the_kernel_and_the_matmul_dtype():
  assert kernels.report(GPT2, 128, "cuda") == "attention: cudnn (auto on cuda); matmuls in bfloat16"
  assert kernels.report(GPT2, 128, "cpu") == "attention: blocked (auto on cpu); matmuls in float32"
