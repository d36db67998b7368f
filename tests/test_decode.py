"""KV-cache decoding: prefill + one token at a time equals one full forward
pass for every paradigm and position scheme; the cache holds exactly what
DESIGN.md's table promises; the sampler never emits unsampleable ids."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd

from configs import tiny
from qvjax import decode, sampling, sharding
from qvjax.model import Decoder

PARADIGMS = [('qkv', 4), ('qkv', 2), ('qkv', 1), ('qv', 2), ('qv_ka', 2), ('mla', 4),
             ('mla_qv', 4)]
POSITIONS = ['rope', 'alibi', 'agf', 'sinusoidal', 'none']
# Cached and full passes sum the same float32 products in another order:
# observed max |diff| ~5e-6 on logits of size ~4.
TOL = dict(rtol=1e-5, atol=2e-5)
B, T, PREFILL, SLOTS = 2, 11, 4, 16


def model_cfg(attention, num_kv_heads=4, position='rope', **mla):
  m = tiny.get_config().model
  m.attention, m.num_kv_heads, m.position = attention, num_kv_heads, position
  m.init_std = 0.3  # Sharp attention, so a wrong key or mask would show.
  m.mla.update(mla)
  return m


def decode_all(model, tokens_BT, prefill=PREFILL, slots=SLOTS):
  cache = decode.init_cache(model.cfg, tokens_BT.shape[0], slots)
  logits, cache = decode.extend(model, cache, tokens_BT[:, :prefill])
  out = [logits]
  for t in range(prefill, tokens_BT.shape[1]):
    logits, cache = decode.extend(model, cache, tokens_BT[:, t:t + 1])
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize('position', POSITIONS)
@pytest.mark.parametrize('attention,kv', PARADIGMS)
def test_prefill_then_steps_equal_one_full_forward(attention, kv, position):
  model = Decoder(model_cfg(attention, kv, position), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 512)
  got, cache = decode_all(model, tokens)
  np.testing.assert_allclose(got, model(tokens), **TOL)
  assert int(cache['index']) == T


def test_mla_with_q_lora_decodes_like_its_forward():
  model = Decoder(model_cfg('mla', q_lora_rank=12), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 512)
  np.testing.assert_allclose(decode_all(model, tokens)[0], model(tokens), **TOL)


def test_unwritten_slots_are_invisible():
  """Garbage in slots past the index must not change anything."""
  model = Decoder(model_cfg('qv', 2), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 512)
  cache = decode.init_cache(model.cfg, B, SLOTS)
  noisy = jax.tree.map(lambda a: a + 7 if a.ndim > 2 else a, cache['layers'])
  clean, _ = decode.extend(model, cache, tokens)
  dirty, _ = decode.extend(model, dict(cache, layers=noisy), tokens)
  np.testing.assert_allclose(dirty, clean, **TOL)


# Per token and layer, as DESIGN.md's table states it (G = 2, d = 8, c = 8,
# r = 16, p = 4 in configs/tiny.py).
TABLE = {
    'qkv': {'k': (2, 8), 'v': (2, 8)},            # 2 G d
    'qv': {'v': (2, 8)},                          # G d
    'qv_ka': {'v': (2, 8), 'ctx': (2, 8)},        # G (d + c)
    'mla': {'latent': (16,), 'k_rope': (4,)},     # r + p
    'mla_qv': {'latent': (16,), 'k_rope': (4,)},  # r + p
}


@pytest.mark.parametrize('attention', list(TABLE))
def test_cache_holds_what_the_table_promises(attention):
  m = model_cfg(attention, 2)
  cache = decode.init_cache(m, 3, 5)
  assert len(cache['layers']) == m.num_layers
  # Per-head arrays are stored heads-major, (B, G, S, width); the rest (B, S, ...).
  stored = lambda s: (3, s[0], 5) + s[1:] if len(s) == 2 else (3, 5) + s
  for layer in cache['layers']:
    assert {k: v.shape for k, v in layer.items()} == {
        k: stored(s) for k, s in TABLE[attention].items()}
  numbers = sum(math.prod(s) for s in TABLE[attention].values())
  assert decode.cache_bytes_per_token(m) == m.num_layers * numbers * 4
  assert decode.cache_bytes_per_token(m, 'bfloat16') == m.num_layers * numbers * 2


def test_cached_entries_are_the_layer_projections():
  """qkv caches the rotated key; qv its value unrotated; mla the normed latent."""
  tokens = jax.random.randint(jax.random.key(1), (1, 6), 0, 512)
  pos = jnp.arange(6)[None]
  for attention in ('qkv', 'qv', 'mla'):
    model = Decoder(model_cfg(attention, 2), nnx.Rngs(0))
    _, cache = decode_all(model, tokens, prefill=6, slots=6)
    block = model.blocks[0]
    x = block.attn_norm(model.embed(tokens, pos))
    layer = cache['layers'][0]
    if attention == 'qkv':
      k = jnp.einsum('btd,dgk->btgk', x, block.attn.w_k_DGd[...])
      from qvjax.positions import apply_rope
      np.testing.assert_allclose(layer['k'].transpose(0, 2, 1, 3), apply_rope(k, pos, 10_000.0),
                                 **TOL)
    elif attention == 'qv':
      np.testing.assert_allclose(layer['v'].transpose(0, 2, 1, 3),
                                 jnp.einsum('btd,dgk->btgk', x, block.attn.w_v_DGd[...]), **TOL)
    else:
      np.testing.assert_allclose(layer['latent'],
                                 block.attn.kv_norm(x @ block.attn.w_dkv_DC[...]), **TOL)


def test_sharded_decoding_matches_and_cache_splits_kv_heads():
  m = model_cfg('qkv', 4)
  model = Decoder(m, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 512)
  want = decode_all(model, tokens)[0]
  graphdef, state = nnx.split(model)
  mesh = sharding.make_mesh((1, 2, 4))

  @jax.jit
  def run(state, tokens):
    return decode_all(nnx.merge(graphdef, state), tokens)

  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(m, mesh)):
    got, cache = run(state, tokens)
  np.testing.assert_allclose(got, want, **TOL)
  spec = cache['layers'][0]['k'].sharding.spec
  assert spec[0] in (('data', 'fsdp'), 'fsdp') and spec[1] == 'tensor', spec  # (B, G, S, d)


class FakeTokenizer:
  vocab_size, pad_id, bos_id, eos_id = 500, 0, 2, 3


def test_padding_ids_are_never_sampled():
  allowed = jnp.asarray(sampling.allowed_ids(512, FakeTokenizer))
  # The forbidden ids carry the largest logits by far.
  logits = jnp.zeros((4000, 512)).at[:, 500:].set(50.0).at[:, [0, 2]].set(50.0)
  for temperature, top_k in ((0.0, 0), (1.0, 0), (1.0, 5)):
    ids = np.asarray(sampling.sample_logits(logits, jax.random.key(0), temperature, top_k,
                                            allowed))
    assert ids.max() < 500 and not np.isin(ids, [0, 2]).any()
  assert np.asarray(sampling.sample_logits(logits, jax.random.key(0), 1.0, 0)).max() >= 500


def test_greedy_sampling_with_cache_equals_full_forward_argmax():
  """Including a window overflow, where the last half is prefilled again."""
  model = Decoder(model_cfg('qv', 2), nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  allowed = sampling.allowed_ids(512, FakeTokenizer)
  prompt, seq_len, n = [2, 17, 99, 5, 300], 8, 12
  got = sampling.generate_ids(graphdef, state, prompt, seq_len=seq_len, max_new_tokens=n,
                              temperature=0.0, top_k=0, seed=0, allowed_V=jnp.asarray(allowed))
  want, context = [], prompt[-seq_len:]
  forward = nnx.jit(lambda model, window: model(window))
  for _ in range(n):
    # Causal: padding after the context does not change its last logits.
    window = np.zeros((1, seq_len), np.int32)
    window[0, :len(context)] = context
    logits = np.asarray(forward(model, jnp.asarray(window))[0, len(context) - 1])
    token = int(np.argmax(np.where(allowed, logits, -np.inf)))
    want.append(token)
    context = (prompt + want)[-(seq_len // 2):] if len(context) == seq_len else context + [token]
  assert got == want and len(set(got)) > 3, (got, want)
