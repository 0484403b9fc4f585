import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import checksum

TREE = {"w": jnp.arange(48.0).reshape(6, 8), "step": jnp.array(3, jnp.int32),
        "h": {"b": jnp.ones((4, 8), jnp.bfloat16), "mask": jnp.array([True, False]), "q": jnp.arange(6, dtype=jnp.int8)}}


@pytest.mark.parametrize("path, changed", [
    ("['w']", lambda t: {**t, "w": t["w"].at[1, 2].set(np.nextafter(np.float32(10.0), np.float32(11.0)))}),  # one bit
    ("['w']", lambda t: {**t, "w": t["w"].at[0, :2].set(t["w"][0, 1::-1])}),  # two values swapped
    ("['h']['b']", lambda t: {**t, "h": {**t["h"], "b": t["h"]["b"].at[3, 7].set(1.0078125)}}),
    ("['h']['mask']", lambda t: {**t, "h": {**t["h"], "mask": ~t["h"]["mask"]}}),
    ("['h']['q']", lambda t: {**t, "h": {**t["h"], "q": t["h"]["q"].at[5].set(-1)}}),
    ("['step']", lambda t: {**t, "step": t["step"] + 1}),
])
def test_any_changed_value_is_found(path, changed):
  assert checksum.first_mismatch(TREE, checksum.checksums(TREE)) is None
  assert checksum.first_mismatch(changed(TREE), checksum.checksums(TREE)) == path


def test_a_sharded_tree_has_the_checksums_of_the_same_values_on_one_device():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
  specs = {"w": P("x", "y"), "step": P(), "h": {"b": P(None, "y"), "mask": P(), "q": P()}}
  sharded = jax.device_put(TREE, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  assert checksum.checksums(sharded) == checksum.checksums(jax.device_put(TREE, jax.devices()[0]))
