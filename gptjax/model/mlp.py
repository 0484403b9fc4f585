"""The feed-forward block: GPT-2's embd -> hidden -> GELU (tanh approximation, "gelu_new") -> embd,
or Llama's SwiGLU, embd -> (gate, up) -> silu(gate) * up -> embd, whose two input projections are
one kernel c_fc [embd, 2, hidden]. The hidden size is `model.mlp_hidden` (default 4 * embd)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model.layers import axes, compute_dtype, sow


def activate(h, swiglu: bool):
  """SwiGLU's silu(gate) * up of h [..., 2, F] (gate, then up), or the tanh GELU of h [..., F]."""
  if swiglu:
    gate, up = jnp.split(h, 2, axis=-2)  # one split: its gradient is one concatenation
    return (jax.nn.silu(gate) * up)[..., 0, :]
  return jax.nn.gelu(h, approximate=True)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.swiglu = cfg.mlp == "swiglu"
    hidden, dtype = cfg.mlp_size, compute_dtype(cfg)
    self.c_fc = nnx.LinearGeneral(cfg.n_embd, (2, hidden) if self.swiglu else (hidden,), use_bias=cfg.bias,
                                  dtype=dtype, kernel_init=nnx.initializers.normal(0.02),
                                  kernel_metadata=axes("embed", *((None,) if self.swiglu else ()), "mlp"),
                                  bias_metadata=axes(*((None,) if self.swiglu else ()), "mlp"), rngs=rngs)
    self.c_proj = nnx.Linear(hidden, cfg.n_embd, use_bias=cfg.bias, dtype=dtype,
                             kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer)),
                             kernel_metadata=axes("mlp", "embed"), bias_metadata=axes("embed"), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BTD, dropout_key: jax.Array | None):
    if self.swiglu:
      gate_up_BT2F = sharding.constrain(self.c_fc(x_BTD), ("batch", "sequence", None, "mlp"))
      sow(self, "gate_and_up", gate_up_BT2F)
      h_BTF = activate(gate_up_BT2F, True)
    else:
      up_BTF = sharding.constrain(self.c_fc(x_BTD), ("batch", "sequence", "mlp"))
      sow(self, "up", up_BTF)
      h_BTF = activate(up_BTF, False)
    sow(self, "activation", h_BTF)
    y_BTD = self.c_proj(h_BTF)
    sow(self, "down", y_BTD)
    return self.dropout(y_BTD, deterministic=dropout_key is None, rngs=dropout_key)
