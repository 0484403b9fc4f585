"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE; DeepSeek's shared expert): a router scores
`model.n_experts` experts for each token, the `model.experts_per_token` best (k) compute its
output, weighted by their router probabilities (renormalised over the k where
`model.moe_norm_topk`), and a shared expert, where there is one, is added for every token.

Dropless: every one of the N x k (token, expert) choices is computed, none dropped for capacity,
and no [tokens, experts] dispatch computes every expert for every token. Two kernels
(`model.moe_matmul`): `ragged_experts` sorts the choices by expert and runs two grouped matmuls
(`jax.lax.ragged_dot`, XLA's grouped matmul op, for accelerators), then puts them back in token
order; `tiled_experts`, for CPUs (where XLA computes ragged_dot as every row times every expert),
places each choice straight into tiles of rows of one expert and runs both matmuls as batched
matmuls over the tiles. Either way the outputs are summed with the router's weights.

Expert parallelism (`mesh.expert`): each device holds n_experts / mesh.expert experts, and the
batch is split over the expert axis too. Within each group of expert devices the tokens are
all-gathered, each device computes the choices that went to its own experts (the grouped matmul's
other rows are in no group: skipped), and the partial outputs are summed back onto the devices that
own the tokens (a reduce-scatter): `expert_parallel`, one `jax.shard_map` over the whole mesh, the
same code on one device (every collective over an axis of 1). Megatron calls this the all-gather
dispatcher. An all-to-all exchange moves each choice rather than each token (k x the rows, a
worst-case buffer per peer to stay dropless); the ragged all-to-all that would move only the chosen
rows is not implemented on CPUs, where gptjax is tested.

The router's two auxiliary losses are returned beside the output: Switch Transformer's
load-balancing loss (Fedus et al. 2021, eq. 4, with k choices as Mixtral's) and ST-MoE's router
z-loss (Zoph et al. 2022); the train step adds them with `optim.router_aux_loss` and
`optim.router_z_loss`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model import mlp
from gptjax.model.layers import axes, compute_dtype, platform, sow
from gptjax.model.mlp import MLP


PROJ_AXES = ("experts", "mlp", "embed")  # the experts' output projections [E, F, D]
TILE = 128  # the most rows per tile of `tiled_experts` (fastest of 32, 64, 128 on a CPU)


def route(logits_NE, k: int, norm_topk: bool):
  """Router logits [N, E] -> (probabilities [N, E], the k chosen experts' weights [N, k] and
  ids [N, k]; float32), the weights renormalised to sum to 1 where `norm_topk`."""
  probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  weights_NK, experts_NK = jax.lax.top_k(probs_NE, k)
  if norm_topk:
    weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
  return probs_NE, weights_NK, experts_NK


def load_balancing_loss(probs_NE, experts_NK):
  """E * sum_e f_e * P_e: f_e the share of the N x k choices that went to expert e, P_e its mean
  router probability. 1 when both are uniform; E when every token picks the same experts."""
  n_experts = probs_NE.shape[-1]
  share_E = jnp.zeros(n_experts, jnp.float32).at[experts_NK.reshape(-1)].add(1.0) / experts_NK.size
  return n_experts * jnp.sum(share_E * jnp.mean(probs_NE, axis=0))


def router_z_loss(logits_NE):
  """The mean squared log-partition of the router's logits."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)))


def _choices(experts_NK, n_experts: int):
  """Each of the M = N x k choices' expert, token-major (n_experts for another device's expert:
  in no group), and each expert's count [E]."""
  expert_M = experts_NK.reshape(-1)
  expert_M = jnp.where((expert_M >= 0) & (expert_M < n_experts), expert_M, n_experts)
  return expert_M, jnp.zeros(n_experts + 1, jnp.int32).at[expert_M].add(1)[:n_experts]


def ragged_experts(x_ND, experts_NK, weights_NK, fc_EDF, proj_EFD, activation):
  """Each token's output: the sum over its k experts of weight * proj(activation(x fc)), through two
  grouped matmuls (ragged_dot) over the choices sorted by expert. fc_EDF [E, D, F'] (F' = 2F for
  SwiGLU's gate and up), proj_EFD [E, F, D]; `activation`: [M, F'] -> [M, F]. A choice of an expert
  outside [0, E) (another device's) is in no group: not computed, adding nothing."""
  n, k = experts_NK.shape
  expert_M, group_sizes_E = _choices(experts_NK, fc_EDF.shape[0])
  order_M = jnp.argsort(expert_M, stable=True)  # the choices grouped by expert
  mine_M1 = (expert_M[order_M] < fc_EDF.shape[0])[:, None]  # rows in no group: zeros in and out, whatever
  x_MD = jnp.where(mine_M1, jnp.take(x_ND, order_M // k, axis=0), 0)  # the kernel leaves in them
  h_MF = activation(jax.lax.ragged_dot(x_MD, fc_EDF, group_sizes_E))
  y_MD = jnp.where(mine_M1, jax.lax.ragged_dot(h_MF, proj_EFD, group_sizes_E), 0)
  y_NKD = jnp.zeros_like(y_MD).at[order_M].set(y_MD).reshape(n, k, -1)  # back in token order
  return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK.astype(y_NKD.dtype))


def tiled_experts(x_ND, experts_NK, weights_NK, fc_EDF, proj_EFD, activation):
  """`ragged_experts` on tiles: each choice goes straight to its place in tiles of rows of one
  expert (each expert's rows padded to whole tiles), both matmuls run as batched matmuls over the
  tiles, each tile times its expert's matrix, and each choice's output is read back from its place:
  at most M + E x tile rows computed, the tile M / E rows (a power of two, at most TILE)."""
  (n, k), experts = experts_NK.shape, fc_EDF.shape[0]
  rows = n * k
  expert_M, sizes_E = _choices(experts_NK, experts)
  tile = min(TILE, 1 << max(0, (-(-rows // experts) - 1).bit_length()))
  n_tiles = -(-rows // tile) + experts  # enough for every expert's rows padded up to whole tiles
  padded_E = -(-sizes_E // tile) * tile
  padded_end_E = jnp.cumsum(padded_E)
  start_E, padded_start_E = jnp.cumsum(sizes_E) - sizes_E, padded_end_E - padded_E
  order_M = jnp.argsort(expert_M, stable=True)  # a choice's rank among its expert's: its sorted place - start
  sorted_expert_M = jnp.minimum(expert_M[order_M], experts - 1)
  sorted_place_M = jnp.where(expert_M[order_M] < experts,
                             padded_start_E[sorted_expert_M] + jnp.arange(rows) - start_E[sorted_expert_M],
                             n_tiles * tile)  # another device's: nowhere
  place_M = jnp.zeros(rows, jnp.int32).at[order_M].set(sorted_place_M)  # token-major
  x_RD = jnp.zeros((n_tiles * tile, x_ND.shape[1]), x_ND.dtype).at[place_M].set(jnp.repeat(x_ND, k, axis=0),
                                                                                  mode="drop")
  tile_expert = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_tiles) * tile, side="right"),
                            experts - 1)  # the tiles past the last expert's hold zeros: any matrix serves
  # L tiles of S rows, each times its expert's matrices
  h_LSF = jnp.einsum("lsd,ldf->lsf", x_RD.reshape(n_tiles, tile, -1), jnp.take(fc_EDF, tile_expert, axis=0))
  h_LSF = activation(h_LSF.reshape(n_tiles * tile, -1)).reshape(n_tiles, tile, -1)
  y_RD = jnp.einsum("lsf,lfd->lsd", h_LSF, jnp.take(proj_EFD, tile_expert, axis=0)).reshape(n_tiles * tile, -1)
  y_NKD = jnp.take(y_RD, place_M, axis=0, mode="fill", fill_value=0).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK.astype(y_NKD.dtype))


def expert_parallel(x_ND, experts_NK, weights_NK, fc, proj, activation, kernel, fc_axes: tuple, proj_axes: tuple):
  """`kernel` (`ragged_experts` or `tiled_experts`) over the mesh (`jax.shard_map`; without a mesh,
  as is), the parameters placed by the rules: the experts over "expert", their hidden size over
  "tensor" (each device's slice, summed after), gathered over "fsdp". Tokens split over "expert"
  are all-gathered within their expert group, each device computes its own experts' choices, and
  the sums are reduce-scattered back; tokens whole over "expert" (a token count that the batch axes
  do not divide) are summed. fc [E, D, (2,) F] and proj [E, F, D], their logical axes `fc_axes` and
  `proj_axes`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(x_ND, experts_NK, weights_NK, fc.reshape(*fc.shape[:2], -1), proj, activation)

  def spec(names, shape):
    """The rules' spec, but the whole embed axis (FSDP gathers the weights for the matmuls) and no
    mesh axis of one device (a collective over one device would be a no-op)."""
    fitted = sharding.fit(sharding.logical_to_spec(tuple(None if n == "embed" else n for n in names)), shape, mesh)
    many = [tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if mesh.shape[a] > 1) for axes in fitted]
    return P(*[None if not axes else axes[0] if len(axes) == 1 else axes for axes in many])

  rows, fc_spec, proj_spec = spec(("batch", None), x_ND.shape), spec(fc_axes, fc.shape), spec(proj_axes, proj.shape)
  expert_axis, hidden_axis = fc_spec[0], proj_spec[1]  # "expert" and "tensor", where they split
  row_axes = (rows[0],) if isinstance(rows[0], str) else rows[0] or ()
  tokens_split = expert_axis is not None and expert_axis in row_axes

  def local(x_ND, experts_NK, weights_NK, fc, proj):
    first = 0
    if expert_axis:
      first = jax.lax.axis_index(expert_axis) * fc.shape[0]
    if tokens_split:
      x_ND, experts_NK, weights_NK = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x_ND, experts_NK, weights_NK))
    y_ND = kernel(x_ND, experts_NK - first, weights_NK, fc.reshape(*fc.shape[:2], -1), proj, activation)
    if tokens_split:
      y_ND = jax.lax.psum_scatter(y_ND, expert_axis, scatter_dimension=0, tiled=True)
    elif expert_axis:
      y_ND = jax.lax.psum(y_ND, expert_axis)
    return jax.lax.psum(y_ND, hidden_axis) if hidden_axis else y_ND

  return jax.shard_map(local, in_specs=(rows, rows, rows, fc_spec, proj_spec), out_specs=rows)(
      x_ND, experts_NK, weights_NK, fc, proj)


KERNELS = {"ragged_dot": ragged_experts, "tiled": tiled_experts}


def matmul_kernel(cfg: ModelConfig) -> str:
  """model.moe_matmul, where auto is tiled on a CPU and ragged_dot elsewhere."""
  if cfg.moe_matmul != "auto":
    return cfg.moe_matmul
  return "tiled" if platform() == "cpu" else "ragged_dot"


def report(cfg: ModelConfig, mesh) -> str:
  """The start-up line of a mixture: its experts, how the mesh splits them and the grouped matmuls' kernel."""
  split = mesh.shape["expert"]
  if cfg.n_experts % split:
    how = f"all on every device: mesh.expert={split} does not divide them"
  else:
    how = f"{cfg.n_experts // split} per device over mesh.expert={split}" + (
        f": each group of {split} devices all-gathers its tokens and reduce-scatters the experts' outputs"
        if split > 1 else "")
  dense = f"; dense layers {list(cfg.dense_layers)}" if cfg.dense_layers else ""
  kernel = matmul_kernel(cfg)
  return (f"experts: {cfg.n_experts} of {cfg.expert_size} ({cfg.experts_per_token} per token{dense}), {how}; "
          f"grouped matmuls: {kernel} ({'model.moe_matmul' if cfg.moe_matmul != 'auto' else f'auto on {platform()}'})")


class ExpertKernels(nnx.Module):
  """Every expert's weights of one projection, stacked: `kernel` [experts, ...]."""

  def __init__(self, shape: tuple, names: tuple, stddev: float, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(stddev)(rngs.params(), shape), **axes(*names))


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    experts, hidden, width = cfg.n_experts, cfg.expert_size, cfg.n_embd
    self.swiglu = cfg.mlp == "swiglu"
    self.router = nnx.Linear(width, experts, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
                             kernel_metadata=axes("embed", None), rngs=rngs)
    fc_shape = (experts, width, 2, hidden) if self.swiglu else (experts, width, hidden)
    self.fc_axes = ("experts", "embed", *((None,) if self.swiglu else ()), "mlp")
    self.c_fc = ExpertKernels(fc_shape, self.fc_axes, 0.02, rngs)
    self.c_proj = ExpertKernels((experts, hidden, width), PROJ_AXES, 0.02 / math.sqrt(2 * cfg.n_layer), rngs)
    if cfg.shared_expert_hidden:
      self.shared = MLP(dataclasses.replace(cfg, mlp_hidden=cfg.shared_expert_hidden), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BTD, dropout_key: jax.Array | None):
    """-> (output [B, T, D], {"router_balance": the load-balancing loss, "router_z": the router z-loss})."""
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    batch, length, width = x_BTD.shape
    x_ND = x_BTD.reshape(-1, width)
    logits_NE = jnp.dot(x_ND, self.router.kernel[...].astype(dtype), preferred_element_type=jnp.float32)
    probs_NE, weights_NK, experts_NK = route(logits_NE, cfg.experts_per_token, cfg.moe_norm_topk)
    sow(self, "router_probs", probs_NE.reshape(batch, length, -1))
    sow(self, "chosen_experts", experts_NK.reshape(batch, length, -1))
    y_ND = expert_parallel(x_ND, experts_NK, weights_NK, self.c_fc.kernel[...].astype(dtype),
                           self.c_proj.kernel[...].astype(dtype), self._activation, KERNELS[matmul_kernel(cfg)],
                           self.fc_axes, PROJ_AXES)
    y_BTD = y_ND.reshape(batch, length, width)
    sow(self, "experts", y_BTD)
    experts_key, shared_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    y_BTD = self.dropout(y_BTD, deterministic=experts_key is None, rngs=experts_key)
    if cfg.shared_expert_hidden:
      y_BTD = y_BTD + self.shared(x_BTD, shared_key)
    stats = {"router_balance": load_balancing_loss(probs_NE, experts_NK), "router_z": router_z_loss(logits_NE)}
    return y_BTD, stats

  def _activation(self, h_MF):
    """[M, 2F] (SwiGLU's gate, then up) or [M, F] -> [M, F], as the dense MLP's."""
    return mlp.activate(h_MF.reshape(h_MF.shape[0], 2, -1) if self.swiglu else h_MF, self.swiglu)
