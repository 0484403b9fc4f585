"""The feed-forward block: embd -> 4 * embd -> GELU (tanh approximation, GPT-2's "gelu_new") -> embd."""

import math

import jax
from flax import nnx

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model.layers import axes, compute_dtype


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    hidden, dtype = 4 * cfg.n_embd, compute_dtype(cfg)
    self.c_fc = nnx.Linear(cfg.n_embd, hidden, use_bias=cfg.bias, dtype=dtype,
                           kernel_init=nnx.initializers.normal(0.02), kernel_metadata=axes("embed", "mlp"),
                           bias_metadata=axes("mlp"), rngs=rngs)
    self.c_proj = nnx.Linear(hidden, cfg.n_embd, use_bias=cfg.bias, dtype=dtype,
                             kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer)),
                             kernel_metadata=axes("mlp", "embed"), bias_metadata=axes("embed"), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BTD, dropout_key: jax.Array | None):
    h_BTF = sharding.constrain(self.c_fc(x_BTD), ("batch", "sequence", "mlp"))
    y_BTD = self.c_proj(jax.nn.gelu(h_BTF, approximate=True))
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key)
