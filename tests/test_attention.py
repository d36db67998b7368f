"""The identities of DESIGN.md that hold between the paradigms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from qvjax.attention import make_attention
from qvjax.model import Decoder

B, T = 2, 12
TOL = dict(rtol=1e-5, atol=1e-5)


def model_cfg(attention='qkv', num_kv_heads=4, **kw):
  m = tiny.get_config().model
  m.attention, m.num_kv_heads = attention, num_kv_heads
  m.init_std = 0.3  # Sharp attention, so a wrong key would show.
  m.update(kw)
  return m


def inputs(seed=0):
  x = jax.random.normal(jax.random.key(seed), (B, T, 32))
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  return x, positions, jnp.ones((B, T), jnp.int32)


def textbook_mha(x, wq, wk, wv, wo, positions, rotate):
  """Per-head softmax(q k^T / sqrt(d)) v with an explicit causal mask."""
  q = rotate(jnp.einsum('btd,dhk->bthk', x, wq), positions)
  k = rotate(jnp.einsum('btd,dhk->bthk', x, wk), positions)
  v = jnp.einsum('btd,dhk->bthk', x, wv)
  scores = jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -1e30)
  out = jnp.einsum('bhts,bshk->bthk', jax.nn.softmax(scores, axis=-1), v)
  return jnp.einsum('bthk,hkd->btd', out, wo)


@pytest.mark.parametrize('position', ['rope', 'none'])
def test_qkv_with_all_heads_is_textbook_mha(position):
  cfg = model_cfg(position=position)
  attn = make_attention(cfg, nnx.Rngs(0))
  x, pos, seg = inputs()
  from qvjax import positions
  rotate = lambda t, p: positions.rotate(t, p, cfg)
  want = textbook_mha(x, attn.w_q_DHd[...], attn.w_k_DGd[...], attn.w_v_DGd[...],
                      attn.w_o_HdD[...], pos, rotate)
  np.testing.assert_allclose(attn(x, pos, seg), want, **TOL)


def test_gqa_equals_mha_with_repeated_kv_weights():
  gqa = make_attention(model_cfg(num_kv_heads=2), nnx.Rngs(0))
  mha = make_attention(model_cfg(num_kv_heads=4), nnx.Rngs(1))
  mha.w_q_DHd[...] = gqa.w_q_DHd[...]
  mha.w_o_HdD[...] = gqa.w_o_HdD[...]
  # KV head g serves query heads g*H/G .. (g+1)*H/G - 1.
  mha.w_k_DGd[...] = jnp.repeat(gqa.w_k_DGd[...], 2, axis=1)
  mha.w_v_DGd[...] = jnp.repeat(gqa.w_v_DGd[...], 2, axis=1)
  x, pos, seg = inputs()
  np.testing.assert_allclose(gqa(x, pos, seg), mha(x, pos, seg), **TOL)


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])
def test_qv_equals_qkv_with_wk_set_to_wv(num_kv_heads):
  qv = make_attention(model_cfg('qv', num_kv_heads), nnx.Rngs(0))
  qkv = make_attention(model_cfg('qkv', num_kv_heads), nnx.Rngs(1))
  for name in ('w_q_DHd', 'w_o_HdD', 'w_v_DGd'):
    getattr(qkv, name)[...] = getattr(qv, name)[...]
  qkv.w_k_DGd[...] = qv.w_v_DGd[...]
  x, pos, seg = inputs()
  np.testing.assert_allclose(qv(x, pos, seg), qkv(x, pos, seg), **TOL)


def test_qv_ka_with_no_ctx_and_identity_wk_equals_qv():
  cfg = model_cfg('qv_ka', 2)
  cfg.qv_ka.ctx_dim = 0
  ka = make_attention(cfg, nnx.Rngs(0))
  qv = make_attention(model_cfg('qv', 2), nnx.Rngs(1))
  for name in ('w_q_DHd', 'w_o_HdD', 'w_v_DGd'):
    getattr(qv, name)[...] = getattr(ka, name)[...]
  ka.w_k_Gid[...] = jnp.broadcast_to(jnp.eye(cfg.head_dim), ka.w_k_Gid.shape)
  x, pos, seg = inputs()
  np.testing.assert_allclose(ka(x, pos, seg), qv(x, pos, seg), **TOL)
  # And a random W_K does change the output: the test above is not vacuous.
  ka.w_k_Gid[...] = jax.random.normal(jax.random.key(3), ka.w_k_Gid.shape)
  changed, base = np.asarray(ka(x, pos, seg)), np.asarray(qv(x, pos, seg))
  assert np.abs(changed - base).max() > 0.05 * np.abs(base).max()


def test_qv_rope_leaves_summed_values_unrotated():
  """With one token, attention returns its value exactly: unrotated even at
  a large position, because rope only touches the key-role copy."""
  cfg = model_cfg('qv', 4)
  attn = make_attention(cfg, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 1, 32))
  far = jnp.full((1, 1), 1000)
  got = attn(x, far, jnp.ones((1, 1), jnp.int32))
  v = jnp.einsum('btd,dgk->btgk', x, attn.w_v_DGd[...])
  np.testing.assert_allclose(got, jnp.einsum('bthk,hkd->btd', v, attn.w_o_HdD[...]), **TOL)


@pytest.mark.parametrize('attention,kv', [('qkv', 4), ('qkv', 1), ('qv', 2), ('qv_ka', 2)])
def test_changing_a_token_never_changes_earlier_logits(attention, kv):
  model = Decoder(model_cfg(attention, kv), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 512)
  t = 7
  changed = tokens.at[0, t].set((tokens[0, t] + 1) % 512)
  a, b = np.asarray(model(tokens)), np.asarray(model(changed))
  np.testing.assert_allclose(a[:, :t], b[:, :t], **TOL)
  assert np.abs(a[:, t:] - b[:, t:]).min(axis=-1).max() > 1e-4


def test_documents_in_one_row_do_not_see_each_other():
  model = Decoder(model_cfg('qv', 2), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 512)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  packed = model(tokens, pos, seg)
  alone = model(tokens[:, 5:])
  np.testing.assert_allclose(packed[:, 5:], alone, **TOL)


@pytest.mark.parametrize('attention', ['qv', 'qv_ka'])
def test_qv_family_gqa_equals_mha_with_repeated_kv_weights(attention):
  gqa = make_attention(model_cfg(attention, num_kv_heads=2), nnx.Rngs(0))
  mha = make_attention(model_cfg(attention, num_kv_heads=4), nnx.Rngs(1))
  for name in ('w_q_DHd', 'w_o_HdD'):
    getattr(mha, name)[...] = getattr(gqa, name)[...]
  mha.w_v_DGd[...] = jnp.repeat(gqa.w_v_DGd[...], 2, axis=1)
  if attention == 'qv_ka':
    mha.w_ctx_DGc[...] = jnp.repeat(gqa.w_ctx_DGc[...], 2, axis=1)
    mha.w_k_Gid[...] = jnp.repeat(gqa.w_k_Gid[...], 2, axis=0)
  x, pos, seg = inputs()
  np.testing.assert_allclose(gqa(x, pos, seg), mha(x, pos, seg), **TOL)


# MLA: r = 16, n = 8, p = 4, e = 8 from configs/tiny.py.


def textbook_mla(attn, x, pos, key_up):
  """DeepSeek-V2's equations written out: per-head keys [c W_UK ; k_rope]
  with the one rope key copied to every head, scale 1/sqrt(n + p)."""
  from qvjax.positions import apply_rope
  m = attn.cfg.mla
  n = m.qk_nope_head_dim
  if m.q_lora_rank:
    q = jnp.einsum('btq,qhk->bthk', attn.q_norm(x @ attn.w_dq_DQ[...]), attn.w_uq_QHk[...])
  else:
    q = jnp.einsum('btd,dhk->bthk', x, attn.w_q_DHk[...])
  q = jnp.concatenate([q[..., :n], apply_rope(q[..., n:], pos, 10_000.0)], -1)
  c = attn.kv_norm(x @ attn.w_dkv_DC[...])
  k_rope = apply_rope((x @ attn.w_kr_DP[...])[:, :, None], pos, 10_000.0)
  k_nope = jnp.einsum('bsc,chn->bshn', c, key_up)
  k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:3] + (4,))], -1)
  v = jnp.einsum('bsc,che->bshe', c, attn.w_uv_CHe[...])
  scores = jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(n + m.qk_rope_head_dim)
  scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -1e30)
  out = jnp.einsum('bhts,bshe->bthe', jax.nn.softmax(scores, axis=-1), v)
  return jnp.einsum('bthe,hed->btd', out, attn.w_o_HeD[...])


@pytest.mark.parametrize('q_lora_rank', [0, 12])
def test_mla_is_deepseek_v2_textbook(q_lora_rank):
  cfg = model_cfg('mla')
  cfg.mla.q_lora_rank = q_lora_rank
  attn = make_attention(cfg, nnx.Rngs(0))
  x, pos, seg = inputs()
  want = textbook_mla(attn, x, pos, attn.w_uk_CHn[...])
  np.testing.assert_allclose(attn(x, pos, seg), want, **TOL)


def test_mla_qv_equals_mla_with_wuk_set_to_wuv():
  qv = make_attention(model_cfg('mla_qv'), nnx.Rngs(0))
  mla = make_attention(model_cfg('mla'), nnx.Rngs(1))
  assert qv.w_uk_CHn is None  # No W_UK at all.
  for name in ('w_q_DHk', 'w_dkv_DC', 'w_kr_DP', 'w_uv_CHe', 'w_o_HeD'):
    getattr(mla, name)[...] = getattr(qv, name)[...]
  mla.w_uk_CHn[...] = qv.w_uv_CHe[...]
  x, pos, seg = inputs()
  np.testing.assert_allclose(qv(x, pos, seg), mla(x, pos, seg), **TOL)
  np.testing.assert_allclose(qv(x, pos, seg), textbook_mla(qv, x, pos, qv.w_uv_CHe[...]), **TOL)


@pytest.mark.parametrize('position', ['rope', 'agf'])
@pytest.mark.parametrize('attention,q_lora_rank', [('mla', 0), ('mla', 12), ('mla_qv', 0)])
def test_mla_absorbed_equals_naive(attention, q_lora_rank, position):
  cfg = model_cfg(attention, position=position)
  cfg.mla.q_lora_rank = q_lora_rank
  attn = make_attention(cfg, nnx.Rngs(0))
  x, pos, _ = inputs()
  entries = attn.cache_entries(x, pos)
  mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
  naive = attn.attend(x, pos, entries, pos, mask)
  absorbed = attn.attend_cached(x, pos, entries, pos, mask)
  np.testing.assert_allclose(absorbed, naive, **TOL)
  assert np.abs(np.asarray(naive)).max() > 1e-2  # Not trivially zero.


def test_mla_runs_alike_on_a_3d_mesh():
  """Params placed by their logical names (latent and embed axes on fsdp,
  heads on tensor): the same logits as one device."""
  from flax.core import spmd
  from qvjax import sharding
  cfg = model_cfg('mla')
  cfg.mla.q_lora_rank = 8
  model = Decoder(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, T), 0, 512)
  want = model(tokens)
  graphdef, state = nnx.split(model)
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(cfg, mesh)):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  np.testing.assert_allclose(got, want, **TOL)
  spec = state['blocks'][0]['attn']['w_uv_CHe'][...].sharding.spec
  assert tuple(spec) == ('fsdp', 'tensor', None), spec
