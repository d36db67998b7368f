"""The one place that decides partitioning: the mesh and the logical axis rules.

Parameters and activations carry logical names; this table maps them onto the
(data, fsdp, tensor) mesh. Batch is split over data and fsdp; parameters are
split over fsdp on their embed axis (ZeRO-3 style; or their latent/ka_in
axis where they have no embed axis) and over tensor on heads,
MLP and vocab (Megatron style).
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from qvjax import config as config_lib
from qvjax.config import MESH_AXES


def make_mesh(shape: tuple[int, ...], devices=None) -> jax.sharding.Mesh:
  """Auto axes: XLA propagates shardings between our explicit constraints."""
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def mesh_for(c) -> jax.sharding.Mesh:
  """The mesh a config asks for over all devices of all processes. With
  several slices the axes are laid out so that only dcn_mesh axes cross the
  data-center network (a TPU slice, or elsewhere one process, per granule)."""
  ici, dcn = config_lib.mesh_shapes(c, jax.device_count())
  n = config_lib.slices(c)
  if n == 1:
    return make_mesh(ici)
  if jax.devices()[0].platform != 'tpu' and n != jax.process_count():
    raise config_lib.ConfigError(
        f'config.dcn_mesh={c.dcn_mesh.to_dict()} is invalid: off TPU each process is one '
        f'slice, so the dcn axes must multiply to the {jax.process_count()} processes')
  devices = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, jax.devices(), process_is_granule=jax.devices()[0].platform != 'tpu')
  return jax.sharding.Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(ici))


def logical_rules(model: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Logical axis -> mesh axis. KV heads fewer than the tensor axis (e.g. MQA
  on tensor=4) cannot be split, so that axis is replicated instead."""
  tensor = mesh.shape['tensor']
  kv_heads = 'tensor'
  if model.num_kv_heads % tensor:
    kv_heads = None
    logging.info('num_kv_heads=%d does not divide mesh.tensor=%d: K/V heads are replicated',
                 model.num_kv_heads, tensor)
  # Weights without an embed axis (MLA's up-projections from the latent,
  # qv_ka's W_K) are split over fsdp on their input axis instead, where it divides.
  # (Checked only for the paradigm that has them, so others log nothing.)
  fsdp = mesh.shape['fsdp']
  latent = ka_in = None
  if model.attention in config_lib.MLA_PARADIGMS:
    latent = _fsdp_if_divides(fsdp, 'latent', model.mla.kv_lora_rank, model.mla.q_lora_rank)
  if model.attention == 'qv_ka':
    ka_in = _fsdp_if_divides(fsdp, 'ka_in', model.qv_ka.ctx_dim + model.head_dim)
  return (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('embed', 'fsdp'),
      ('vocab', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', kv_heads),
      ('mlp', 'tensor'),
      ('head_dim', None),
      ('ka_in', ka_in),
      ('latent', latent),
      ('norm', None),
      ('act_embed', None),
      ('act_heads', 'tensor'),
      ('act_kv_heads', kv_heads),
      ('act_mlp', 'tensor'),
      ('act_vocab', 'tensor'),
  )


def _fsdp_if_divides(fsdp: int, name: str, *widths: int):
  if all(w % fsdp == 0 for w in widths if w):
    return 'fsdp'
  logging.info('%s widths %s do not all divide mesh.fsdp=%d: replicated', name, widths, fsdp)
  return None


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
