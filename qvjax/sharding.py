"""The one place that decides partitioning: the mesh and the logical axis rules.

Parameters and activations carry logical names; this table maps them onto the
(data, fsdp, tensor) mesh. Batch is split over data and fsdp; parameters are
split over fsdp on their embed axis (ZeRO-3 style) and over tensor on heads,
MLP and vocab (Megatron style).
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from qvjax import config as config_lib
from qvjax.config import MESH_AXES


def make_mesh(shape: tuple[int, ...], devices=None) -> jax.sharding.Mesh:
  """Auto axes: XLA propagates shardings between our explicit constraints."""
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def mesh_for(c) -> jax.sharding.Mesh:
  """The mesh a config asks for over all devices of all processes."""
  return make_mesh(config_lib.mesh_shape(c, jax.device_count()))


def logical_rules(model: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Logical axis -> mesh axis. KV heads fewer than the tensor axis (e.g. MQA
  on tensor=4) cannot be split, so that axis is replicated instead."""
  tensor = mesh.shape['tensor']
  kv_heads = 'tensor'
  if model.num_kv_heads % tensor:
    kv_heads = None
    logging.info('num_kv_heads=%d does not divide mesh.tensor=%d: K/V heads are replicated',
                 model.num_kv_heads, tensor)
  return (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('embed', 'fsdp'),
      ('vocab', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', kv_heads),
      ('mlp', 'tensor'),
      ('head_dim', None),
      ('ka_in', None),
      ('norm', None),
      ('act_embed', None),
      ('act_heads', 'tensor'),
      ('act_kv_heads', kv_heads),
      ('act_mlp', 'tensor'),
      ('act_vocab', 'tensor'),
  )


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def state_shardings(abstract_state, mesh):
  """NamedShardings for a state tree, from each Variable's logical names
  (call inside `flax.core.spmd.logical_axis_rules`)."""
  return nnx.get_named_sharding(abstract_state, mesh)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(mesh) -> str:
  return ' x '.join(f'{n}={s}' for n, s in mesh.shape.items()) + \
      f' over {np.prod(list(mesh.shape.values()))} {mesh.devices.flat[0].platform} devices'
