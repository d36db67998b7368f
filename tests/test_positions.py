"""Position schemes: their formulas, where they act, and what they must not do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from qvjax import positions
from qvjax.attention import make_attention
from qvjax.config import ConfigError, validate_model
from qvjax.model import Decoder

TOL = dict(rtol=1e-5, atol=1e-5)
T = 10
SCHEMES = ['rope', 'alibi', 'agf', 'sinusoidal', 'none']


def model_cfg(attention='qkv', position='rope', num_kv_heads=2):
  m = tiny.get_config().model
  m.attention, m.position, m.num_kv_heads = attention, position, num_kv_heads
  m.init_std = 0.3
  return m


def test_alibi_slopes_are_the_papers():
  np.testing.assert_allclose(positions.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(positions.alibi_slopes(4), 2.0 ** -np.array([2, 4, 6, 8]))
  # Not a power of two: the 4-head slopes, then every other 8-head slope.
  np.testing.assert_allclose(positions.alibi_slopes(6),
                             2.0 ** -np.array([2, 4, 6, 8, 1, 3]))


def test_agf_bias_is_a_nonnegative_power_law():
  cfg = model_cfg(position='agf')
  raw = positions.agf_param(cfg)
  np.testing.assert_allclose(jax.nn.softplus(raw[...]), np.geomspace(2.0, 0.125, 4), rtol=1e-5)
  q_pos, k_pos = jnp.array([[5]]), jnp.arange(6)[None]
  bias = positions.bias(cfg, raw, q_pos, k_pos)[0, :, 0]  # (H, S)
  alpha = np.geomspace(2.0, 0.125, 4)
  want = -alpha[:, None] * np.log1p(5 - np.arange(6))[None]
  np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-6)
  # Whatever the raw parameter, alpha >= 0: far keys are never favoured.
  raw[...] = jnp.full((4,), -50.0)
  assert (np.asarray(positions.bias(cfg, raw, q_pos, k_pos)) <= 0).all()


def test_alibi_bias_is_linear_in_distance():
  cfg = model_cfg(position='alibi')
  bias = positions.bias(cfg, None, jnp.array([[7]]), jnp.arange(8)[None])[0, :, 0]
  np.testing.assert_allclose(bias, -positions.alibi_slopes(4)[:, None] * (7 - np.arange(8)),
                             **TOL)


def test_sinusoidal_table():
  pe = np.asarray(positions.sinusoidal(jnp.array([[0, 3]]), 6))[0]
  np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
  k = np.arange(6)
  angle = 3 / 10_000 ** ((k // 2) * 2 / 6)
  np.testing.assert_allclose(pe[1], np.where(k % 2 == 0, np.sin(angle), np.cos(angle)), **TOL)


def reference(q, k, v, bias, scale, wo):
  """softmax(q k^T * scale + bias) v per head, causal, written out."""
  scores = jnp.einsum('bthk,bshk->bhts', q, k) * scale + bias
  scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -1e30)
  return jnp.einsum('bthe,hed->btd', jnp.einsum('bhts,bshe->bthe',
                                                jax.nn.softmax(scores, -1), v), wo)


@pytest.mark.parametrize('position', ['alibi', 'agf'])
@pytest.mark.parametrize('attention', ['qkv', 'qv', 'mla'])
def test_bias_schemes_are_textbook_attention_plus_bias(attention, position):
  cfg = model_cfg(attention, position, num_kv_heads=4)
  attn = make_attention(cfg, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, T, 32))
  pos = jnp.broadcast_to(jnp.arange(T), (2, T))
  seg = jnp.ones((2, T), jnp.int32)
  bias = positions.bias(cfg, attn.agf_raw_H, pos, pos)
  entries = attn.cache_entries(x, pos)
  if attention == 'mla':
    c = entries['latent']
    q = jnp.einsum('btd,dhk->bthk', x, attn.w_q_DHk[...])
    k_nope = jnp.einsum('bsc,chn->bshn', c, attn.w_uk_CHn[...])
    k = jnp.concatenate([k_nope, jnp.broadcast_to(entries['k_rope'][:, :, None],
                                                  k_nope.shape[:3] + (4,))], -1)
    v = jnp.einsum('bsc,che->bshe', c, attn.w_uv_CHe[...])
    scale, wo = (8 + 4) ** -0.5, attn.w_o_HeD[...]
  else:
    q = jnp.einsum('btd,dhk->bthk', x, attn.w_q_DHd[...])
    k, v = attn.keys_values(entries, pos)
    scale, wo = 8 ** -0.5, attn.w_o_HdD[...]
  got = np.asarray(attn(x, pos, seg))
  np.testing.assert_allclose(got, reference(q, k, v, bias, scale, wo), **TOL)
  unbiased = reference(q, k, v, 0.0, scale, wo)
  assert np.abs(got - np.asarray(unbiased)).max() > 1e-3  # The bias does matter.


@pytest.mark.parametrize('position', SCHEMES)
def test_relative_schemes_ignore_a_shift_of_all_positions(position):
  model = Decoder(model_cfg('qv', position), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 512)
  pos = jnp.arange(T)[None]
  a, b = np.asarray(model(tokens, pos)), np.asarray(model(tokens, pos + 37))
  if position == 'sinusoidal':  # Absolute: a shift changes the input itself.
    assert np.abs(a - b).max() > 1e-3
  else:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('position', SCHEMES)
@pytest.mark.parametrize('attention', ['qkv', 'qv_ka', 'mla_qv'])
def test_positions_restart_in_every_packed_document(attention, position):
  model = Decoder(model_cfg(attention, position), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 512)
  seg = jnp.array([[1] * 4 + [2] * 6])
  pos = jnp.array([list(range(4)) + list(range(6))])
  np.testing.assert_allclose(model(tokens, pos, seg)[:, 4:], model(tokens[:, 4:]), **TOL)


@pytest.mark.parametrize('position', ['alibi', 'agf', 'sinusoidal'])
def test_every_scheme_changes_the_model(position):
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 512)
  plain = np.asarray(Decoder(model_cfg('qkv', 'none'), nnx.Rngs(0))(tokens))
  with_pos = np.asarray(Decoder(model_cfg('qkv', position), nnx.Rngs(0))(tokens))
  assert np.abs(plain - with_pos)[:, 1:].max() > 1e-3


def test_agf_exponents_are_learned():
  model = Decoder(model_cfg('qv', 'agf'), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 512)
  grads = nnx.grad(lambda m: jnp.sum(m(tokens)[0, -1] ** 2))(model)
  assert np.abs(np.asarray(grads['blocks'][0]['attn']['agf_raw_H'][...])).max() > 0


@pytest.mark.parametrize('edit,needle', [
    (dict(position='learned'), 'model.position'),
    (dict(attention='mla', mla=dict(kv_lora_rank=0)), 'model.mla.kv_lora_rank'),
    (dict(attention='mla', mla=dict(qk_rope_head_dim=3)), 'model.mla.qk_rope_head_dim'),
    (dict(attention='mla_qv', mla=dict(v_head_dim=16)), 'model.mla.qk_nope_head_dim'),
    (dict(position='agf', agf=dict(init_min=0.0)), 'model.agf'),
])
def test_bad_position_and_mla_knobs_fail_validation(edit, needle):
  m = model_cfg()
  m.update(edit)
  with pytest.raises(ConfigError, match=needle.replace('.', r'\.')):
    validate_model(m)


def test_mla_without_rope_key_is_valid_off_rope():
  m = model_cfg('mla', 'alibi')
  m.mla.qk_rope_head_dim = 0
  validate_model(m)
  assert Decoder(m, nnx.Rngs(0))(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 512)
