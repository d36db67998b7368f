"""KV-cache decoding: prefill, then one token at a time.

Each paradigm caches exactly DESIGN.md's table (per token and layer):
  qkv     rotated K and V                      2 G d
  qv      V only (keys re-rotated per step)    G d
  qv_ka   V and the ctx vector (K rebuilt)     G (d + c)
  mla     latent c and the shared rope key     r + p    (absorbed decode)
  mla_qv  the same                             r + p
The layout comes from each attention class's `cache_layout`, so the bytes
reported here are the arrays decoding really allocates.

A cache is a pytree: {'index': slots filled, 'positions': (B, S) position of
each slot, 'layers': [per layer {name: (B, S, ...)}]}; per-head arrays (qkv's
k and v, qv's v, qv_ka's v and ctx) are stored heads-major, (B, G, S, width),
so that decoding reads each head's slots contiguously. Every array carries
logical axis names, so it shards like the activations (batch over data/fsdp,
KV heads over tensor). One row is one document: the token in slot i has
position i. `extend` never checks for overflow (slots past S would be
clamped by XLA): callers keep index + T <= S.
"""

import math

import jax
import jax.numpy as jnp

from qvjax.attention import PARADIGMS
from qvjax.attention.base import heads_major, stored_axes
from qvjax.layers import constrain

POSITION_AXES = ('batch', 'length')


def cache_layout(m) -> dict:
  """name -> (per-token shape, logical axes) of one layer's cache."""
  return PARADIGMS[m.attention].cache_layout(m)


def cache_bytes_per_token(m, dtype=None) -> int:
  """Bytes one token occupies in the cache, summed over all layers."""
  itemsize = jnp.dtype(dtype or m.dtype).itemsize
  per_layer = sum(math.prod(shape) for shape, _ in cache_layout(m).values())
  return m.num_layers * per_layer * itemsize


def stored_shape(shape, axes, batch: int, length: int) -> tuple:
  """A layer array's shape: (B, S) + per-token shape, or heads-major
  (B, heads, S, width) for per-head arrays (qvjax.attention.base.heads_major)."""
  if heads_major(axes):
    return (batch, shape[0], length) + tuple(shape[1:])
  return (batch, length) + tuple(shape)


def init_cache(m, batch: int, length: int, dtype=None) -> dict:
  """An empty cache of `length` slots (zeros; nothing is visible until written)."""
  dtype = jnp.dtype(dtype or m.dtype)
  layout = cache_layout(m)
  layers = [{name: constrain(jnp.zeros(stored_shape(shape, axes, batch, length), dtype),
                             stored_axes(axes))
             for name, (shape, axes) in layout.items()} for _ in range(m.num_layers)]
  return {'index': jnp.zeros((), jnp.int32),
          'positions': constrain(jnp.zeros((batch, length), jnp.int32), POSITION_AXES),
          'layers': layers}


def extend(model, cache, tokens_BT):
  """Feeds T new tokens (slots index .. index+T-1); returns (logits_BTV, cache).

  Prefill is extend from an empty cache; a decode step is extend with T = 1.
  """
  B, T = tokens_BT.shape
  index = cache['index']
  S = cache['positions'].shape[1]
  slots_T = index + jnp.arange(T, dtype=jnp.int32)
  positions_BT = jnp.broadcast_to(slots_T, (B, T))
  kv_positions_BS = constrain(
      jax.lax.dynamic_update_slice_in_dim(cache['positions'], positions_BT, index, 1),
      POSITION_AXES)
  # Causal over slots: also hides every slot not written yet.
  mask_11TS = (jnp.arange(S)[None, :] <= slots_T[:, None])[None, None]
  logits_BTV, layers = model.extend(tokens_BT, positions_BT, cache['layers'], index,
                                    kv_positions_BS, mask_11TS)
  return logits_BTV, {'index': index + T, 'positions': kv_positions_BS, 'layers': layers}
