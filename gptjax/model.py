"""The GPT-2 decoder in Flax: learned positions, pre-LayerNorm blocks, tied LM head.

Parameter names follow GPT-2 (wte, wpe, h_i/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}},
ln_f), so a GPT-2 checkpoint maps onto this model 1:1. The attention projections keep the head
axis separate (c_attn kernel [embd, 3, heads, head_dim]) so that tensor parallelism can split
heads; that is a reshape of GPT-2's [embd, 3 * embd] matrix.

Every parameter carries logical axis names (vocab, embed, heads, kv, mlp), and the main activations
are constrained by name too (batch, sequence, ...); `gptjax.sharding` maps the names onto the device
mesh. The activation constraints apply only when a step is traced under `jax.set_mesh`.

With `decode=True` the model reads and extends a key/value cache (collection "cache") and takes
only the new tokens, which is how `gptjax.sample` generates without re-running the context.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import sharding
from gptjax.config import ModelConfig


ACTIVATION_AXES = ("batch", "sequence", "embed")  # the residual stream [B, T, embd]


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  if cfg.dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(cfg.dtype)


def _init(std: float, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_epsilon, use_bias=cfg.bias, dtype=compute_dtype(cfg), name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, start, *, deterministic: bool, decode: bool):
    cfg = self.cfg
    head_dim = cfg.n_embd // cfg.n_head
    qkv = nn.DenseGeneral(
        (3, cfg.n_head, head_dim), use_bias=cfg.bias, dtype=compute_dtype(cfg), name="c_attn",
        kernel_init=_init(0.02, ("embed", None, "heads", "kv")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "kv")))(x)
    qkv = sharding.constrain(qkv, ("batch", "sequence", None, "heads", "kv"))  # [B, T, 3, heads, head_dim]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, heads, head_dim] each

    if decode:
      # Write the new keys/values at positions [start, start + T) and attend over the whole
      # cache; keys past each query's position (including unwritten ones) are masked out.
      batch, length = x.shape[0], x.shape[1]
      cache_shape = (batch, cfg.block_size, cfg.n_head, head_dim)
      cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
      cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
      cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
      k, v = cached_k.value, cached_v.value  # [B, block_size, heads, head_dim]
      query_pos = start + jnp.arange(length)
      mask = jnp.arange(cfg.block_size)[None, :] <= query_pos[:, None]  # [T, block_size]
      y = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
    else:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, heads, head_dim]

    y = nn.DenseGeneral(
        cfg.n_embd, axis=(-2, -1), use_bias=cfg.bias, dtype=compute_dtype(cfg), name="c_proj",
        kernel_init=_init(0.02 / math.sqrt(2 * cfg.n_layer), ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(y)  # [B, T, embd]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    h = nn.Dense(4 * cfg.n_embd, use_bias=cfg.bias, dtype=compute_dtype(cfg), name="c_fc",
                 kernel_init=_init(0.02, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)  # [B, T, 4 * embd]
    h = sharding.constrain(h, ("batch", "sequence", "mlp"))
    h = nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
    h = nn.Dense(cfg.n_embd, use_bias=cfg.bias, dtype=compute_dtype(cfg), name="c_proj",
                 kernel_init=_init(0.02 / math.sqrt(2 * cfg.n_layer), ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)  # [B, T, embd]
    return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, start, deterministic: bool, decode: bool):  # positional: nn.remat's static_argnums
    x = x + CausalSelfAttention(self.cfg, name="attn")(
        _layer_norm(self.cfg, "ln_1")(x), start, deterministic=deterministic, decode=decode)
    x = x + MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x), deterministic=deterministic)
    return sharding.constrain(x, ACTIVATION_AXES)


class GPT(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, decode: bool = False):
    """tokens: int [B, T] -> logits: float32 [B, T, vocab]."""
    cfg = self.cfg
    length = tokens.shape[1]
    if decode:  # tokens continue the cached sequence at `position`
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      start = position.value
      position.value = start + length
    else:
      start = 0

    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=compute_dtype(cfg), name="wte",
                   embedding_init=_init(0.02, ("vocab", "embed")))
    wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=compute_dtype(cfg), name="wpe",
                   embedding_init=_init(0.02, (None, "embed")))
    table = sharding.constrain(wte.embedding, ("vocab", None))  # gathered over fsdp for the lookup
    x = jnp.take(table, tokens, axis=0).astype(compute_dtype(cfg))  # [B, T, embd]
    x = x + wpe(start + jnp.arange(length))[None]
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = sharding.constrain(x, ACTIVATION_AXES)

    block = nn.remat(Block, static_argnums=(3, 4)) if cfg.remat else Block
    for i in range(cfg.n_layer):
      x = block(cfg, name=f"h_{i}")(x, start, deterministic, decode)
    x = _layer_norm(cfg, "ln_f")(x)
    logits = wte.attend(x).astype(jnp.float32)  # [B, T, vocab], head tied to the token embedding
    return sharding.constrain(logits, ("batch", "sequence", "vocab"))


def init_params(cfg: ModelConfig, rng: jax.Array):
  """Parameters boxed with their logical axis names (see `gptjax.sharding`)."""
  return GPT(cfg).init({"params": rng}, jnp.zeros((1, cfg.block_size), jnp.int32))["params"]


def abstract_params(cfg: ModelConfig):
  """`init_params`' ShapeDtypeStructs, still boxed with their logical axis names; no memory used."""
  return jax.eval_shape(lambda rng: init_params(cfg, rng), jax.random.key(0))


def count_params(params, *, exclude_positions: bool = False) -> int:
  n = sum(p.size for p in jax.tree.leaves(params))
  return n - params["wpe"]["embedding"].size if exclude_positions else n
