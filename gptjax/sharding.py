"""The device mesh and the logical-axis rules that place parameters and batches on it.

Parallelism is chosen by the mesh shape alone (`MeshConfig`): data parallelism splits the batch
over "data"; FSDP (ZeRO-3) splits the batch and every parameter's embed axis over "fsdp"; tensor
parallelism (Megatron) splits attention heads, the MLP hidden axis and the vocabulary over
"tensor". The model names its parameter axes (see `gptjax.model`); these rules map them.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import MeshConfig
from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
)


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


def logical_to_mesh_sharding(logical_specs, mesh: Mesh):
  """A tree of logical PartitionSpecs (from boxed parameters) -> a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


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
