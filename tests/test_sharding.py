"""One seed, one batch: the same losses on every mesh shape, for every paradigm."""

import jax
import numpy as np
import pytest
from flax.core import spmd

from configs import tiny
from qvjax import sharding, train

MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]


def synthetic_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  rows = rng.integers(3, c.model.vocab_size, (c.global_batch_size, c.seq_len + 1), np.int32)
  seg = np.ones((c.global_batch_size, c.seq_len), np.int32)
  seg[:, c.seq_len // 2:] = 2  # Two documents per row.
  pos = np.concatenate([np.arange(c.seq_len // 2)] * 2)[None].repeat(c.global_batch_size, 0)
  weights = np.ones(seg.shape, np.float32)
  weights[:, c.seq_len // 2 - 1] = 0  # No loss across the boundary.
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:], 'segment_ids': seg,
          'positions': pos.astype(np.int32), 'weights': weights}


def losses_on(mesh_shape, attention, steps=3):
  c = tiny.get_config()
  c.model.attention = attention
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(c.model, mesh)):
    setup = train.build(c, mesh)
    step_fn = train.make_train_step(setup, mesh)
    state = setup.init()
    batch = train.to_global(synthetic_batch(c), mesh)
    losses = []
    for _ in range(steps):
      state, stats = step_fn(state, batch)
      losses.append(float(stats['loss']))
    specs = {name: p[...].sharding.spec for name, p in state[0]['blocks'][0]['attn'].items()
             if hasattr(p, 'shape')}
  return np.array(losses), specs


# Each paradigm's parameter split over tensor (by heads) and one without an
# embed axis that fsdp splits on its input axis (None: the paradigm has none).
SPLIT = {'qkv': ('w_q_DHd', None), 'qv': ('w_q_DHd', None), 'qv_ka': ('w_q_DHd', 'w_k_Gid'),
         'mla': ('w_uv_CHe', 'w_uv_CHe')}


@pytest.mark.parametrize('attention', ['qkv', 'qv', 'qv_ka', 'mla'])
def test_same_losses_on_every_mesh_and_loss_falls(attention):
  base, _ = losses_on(MESHES[0], attention)
  assert base[-1] < base[0]
  by_heads, no_embed = SPLIT[attention]
  for shape in MESHES[1:]:
    losses, specs = losses_on(shape, attention)
    # float32 reductions reorder across shardings: 1e-5 relative.
    np.testing.assert_allclose(losses, base, rtol=1e-5, err_msg=str(shape))
    if shape[2] > 1:
      assert 'tensor' in specs[by_heads]  # Heads really are split on the tensor axis.
    if shape[1] > 1 and no_embed:
      assert 'fsdp' in specs[no_embed], specs[no_embed]  # Not replicated over fsdp.


def test_kv_heads_fewer_than_tensor_axis_are_replicated():
  c = tiny.get_config()  # num_kv_heads=2
  mesh = sharding.make_mesh((1, 2, 4))
  rules = dict(sharding.logical_rules(c.model, mesh))
  assert rules['kv_heads'] is None and rules['heads'] == 'tensor'
