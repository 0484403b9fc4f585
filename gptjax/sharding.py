"""The device mesh, the logical-axis rules that place parameters and activations on it, and
multi-process start-up.

Parallelism is chosen by the mesh shape alone (`MeshConfig`): data parallelism splits the batch
over "data"; FSDP (ZeRO-3) splits the batch and every parameter's embed axis over "fsdp"; tensor
parallelism (Megatron) splits attention heads, the MLP hidden axis and the vocabulary over
"tensor". The model names the axes of its parameters and activations (see `gptjax.model`); the
one table below maps them. Rules are tried in order and a mesh axis serves at most one dimension
of an array, so an activation [batch, sequence, embed] keeps its embed axis whole: "fsdp" already
splits its batch. A parameter dimension that a mesh axis does not divide (a vocabulary of 77 over
tensor=8) stays whole on that axis.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import DistributedConfig, MeshConfig
from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("sequence", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
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
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if sizes.count(-1) > 1:
    raise UserError("at most one mesh axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise UserError(f"mesh axes {sizes} do not divide the {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise UserError(f"mesh data*fsdp*tensor = {math.prod(sizes)} but there are {n_devices} devices")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """`sharding` without the mesh axes of any dimension they do not divide."""
  spec = []
  for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    spec.append(axes if dim % math.prod(sharding.mesh.shape[a] for a in names) == 0 else None)
  return NamedSharding(sharding.mesh, P(*spec))


def param_shardings(boxed_params, mesh: Mesh):
  """Parameters boxed with logical axis names (arrays or ShapeDtypeStructs) -> NamedShardings."""
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, LOGICAL_AXIS_RULES)
  return jax.tree.map(lambda s, p: _fit(s, p.shape), shardings, nn.meta.unbox(boxed_params))


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """Constrains an activation's sharding by logical axis names, when traced under `jax.set_mesh`;
  otherwise (sampling, evaluation on one device) it is `x` unchanged."""
  return nn.with_logical_constraint(x, logical_axes, rules=LOGICAL_AXIS_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """For token batches shaped [accum, batch, block]: the batch axis is split over data and fsdp."""
  return NamedSharding(mesh, P(None, ("data", "fsdp"), None))


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
