"""The device mesh, the logical-axis rules that place parameters, activations and the KV cache on
it, and multi-process start-up.

Parallelism is chosen by the mesh shape alone (`MeshConfig`): data parallelism splits the batch
over "data"; FSDP (ZeRO-3) splits the batch and every parameter's embed axis over "fsdp"; expert
parallelism splits a mixture's experts over "expert", and the batch too (outside the experts it is
one more data axis; `gptjax.model.moe` exchanges the tokens); tensor parallelism (Megatron) splits
attention heads, the MLP hidden axis and the vocabulary over "tensor". The model names the axes of
its parameters and activations (see `gptjax.model`); the one table below maps them. Rules are tried
in order and a mesh axis serves at most one dimension of an array, so an activation [batch,
sequence, embed] keeps its embed axis whole: "fsdp" already splits its batch. A parameter dimension that a mesh axis does not divide (a vocabulary of 77 over
tensor=8) stays whole on that axis.
"""

import contextlib
import math

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import config as config_lib
from gptjax.config import DistributedConfig, MeshConfig
from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split a batch

LOGICAL_AXIS_RULES = (
    ("layers", None),  # the stacked blocks' leading axis
    ("batch", BATCH_AXES),
    ("sequence", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention's key/value heads: split where tensor divides them
    ("mlp", "tensor"),
    ("kv", None),
    ("experts", "expert"),  # a mixture's experts
)


def initialize_distributed(cfg: DistributedConfig) -> None:
  """Joins a multi-process run through `jax.distributed` when the config or the environment asks.

  Unset fields are left to JAX, which detects them on SLURM, Open MPI, Cloud TPU and GKE, and
  reads JAX_COORDINATOR_ADDRESS. Must run before anything touches the devices.
  """
  if jax.distributed.is_initialized() or not (cfg.initialize or cfg.coordinator_address or cfg.num_processes):
    return
  try:
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes or None,
        process_id=None if cfg.process_id < 0 else cfg.process_id)
  except (RuntimeError, ValueError, TypeError) as e:
    raise UserError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from None


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
  if sizes.count(-1) > 1:
    raise UserError("at most one mesh axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      named = " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
      raise UserError(f"mesh {named} does not divide the {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise UserError(f"mesh data*fsdp*expert*tensor = {math.prod(sizes)} but there are {n_devices} devices")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def inference_mesh(overrides: list[str], devices=None) -> Mesh:
  """The mesh that `mesh.*` overrides describe over `devices` (default: this process's devices;
  with no overrides, data parallel over all of them)."""
  others = [item for item in overrides if not item.startswith("mesh.")]
  if others:
    raise UserError(f"only mesh.* overrides apply here, not {others[0]!r}")
  return make_mesh(config_lib.load_config(None, overrides).mesh, devices or jax.local_devices())


def pad_rows(rows: np.ndarray, mesh: Mesh | None) -> np.ndarray:
  """`rows` [B, ...] with zero rows appended up to a multiple of the mesh's batch shards."""
  missing = -len(rows) % batch_shards(mesh)
  return np.concatenate([rows, np.zeros((missing, *rows.shape[1:]), rows.dtype)]) if missing else rows


def logical_to_spec(names: tuple, rules=LOGICAL_AXIS_RULES) -> P:
  """Logical axis names -> a PartitionSpec. Rules are tried in order; a rule applies when none of
  its mesh axes is taken yet, so a mesh axis serves one dimension at most."""
  if len({n for n in names if n is not None}) < len([n for n in names if n is not None]):
    raise ValueError(f"a logical axis name occurs twice in {names}")
  spec, taken, placed = [None] * len(names), set(), set()
  for name, mesh_axes in rules:
    if name not in names or name in placed:
      continue
    wanted = set() if mesh_axes is None else {mesh_axes} if isinstance(mesh_axes, str) else set(mesh_axes)
    if not wanted & taken:
      spec[names.index(name)] = mesh_axes
      taken |= wanted
      placed.add(name)
  return P(*spec)


def fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` without the mesh axes of any dimension they do not divide."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    fitted.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return P(*fitted)


# What lets a dimension split, by its logical axis: printed beside a parameter the mesh cannot split.
_MAKES_IT_SPLIT = {"vocab": "model.vocab_multiple a multiple of {size}", "heads": "model.n_head a multiple of {size}",
                   "kv_heads": "model.n_kv_head a multiple of {size}", "mlp": "model.mlp_hidden a multiple of {size}",
                   "embed": "model.n_embd a multiple of {size}", "experts": "model.n_experts a multiple of {size}"}


def unsplit_report(shapes, names, mesh: Mesh) -> list[str]:
  """A line per parameter dimension that the rules split but the mesh does not divide, so it stays
  whole (replicated over those mesh axes): its name, shape, logical axis, the mesh size and what
  would let it split."""
  lines = []
  flat_names = traverse_util.flatten_dict(names, sep="/")
  for name, x in traverse_util.flatten_dict(shapes, sep="/").items():
    axis_names = flat_names[name]
    wanted, fitted = logical_to_spec(axis_names), fit(logical_to_spec(axis_names), x.shape, mesh)
    for dim, (logical, asked, got) in enumerate(zip(axis_names, wanted, fitted)):
      if asked is not None and got is None:
        mesh_axes = (asked,) if isinstance(asked, str) else asked
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if size > 1:
          remedy = _MAKES_IT_SPLIT.get(logical, "a size that {size} divides").format(size=size)
          lines.append(f"not split: {name} {list(x.shape)}: {logical} {x.shape[dim]} over {'x'.join(mesh_axes)}={size} "
                       f"does not divide, so this dimension is replicated; {remedy} would split it")
  return lines


def param_shardings(shapes, names, mesh: Mesh):
  """Parameters' ShapeDtypeStructs and logical axis names (same tree) -> NamedShardings."""
  return jax.tree.map(lambda x, n: NamedSharding(mesh, fit(logical_to_spec(n), x.shape, mesh)), shapes, names)


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """Constrains an activation's sharding by logical axis names when traced under `jax.set_mesh`;
  otherwise it is `x` unchanged."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """For arrays whose first axis is a batch: split over the batch axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh | None) -> int:
  """How many ways the batch is split (1 without a mesh): a batch must be a multiple of this."""
  return 1 if mesh is None else math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def on_mesh(mesh: Mesh | None):
  """`jax.set_mesh(mesh)`, so that activation constraints bind; nothing without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def put_rows(arrays, mesh: Mesh | None):
  """Arrays whose first axis is a batch, split over the mesh's batch axes (as they are without one)."""
  return arrays if mesh is None else jax.device_put(arrays, rows_sharding(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """For token batches shaped [accum, batch, block]: the batch axis is split over the batch axes."""
  return NamedSharding(mesh, P(None, BATCH_AXES, None))


def put_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows of a batch -> one global array (each process passes its own rows)."""
  sharding = batch_sharding(mesh)
  global_shape = (local_batch.shape[0], local_batch.shape[1] * jax.process_count(), local_batch.shape[2])
  return jax.make_array_from_process_local_data(sharding, local_batch, global_shape)


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs placed with `shardings`."""
  sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
                       abstract_tree, shardings)
  return sum(jax.tree.leaves(sizes))
