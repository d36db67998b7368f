"""What every head-based paradigm (qkv, qv, qv_ka) shares: the query and
output projections, the mask, position biases and the attention op. A
paradigm says only what it caches per token and how keys and values are
rebuilt from that.

The full forward pass and cached decoding run the same code: the forward
computes every token's cache entries and attends over them; decoding writes
the new tokens' entries into a preallocated cache and attends over that.

Shapes: x (B, T, D); H query heads of width d; G key/value heads, each serving
H/G query heads; S key/value slots. GQA is never computed by repeating K/V:
`dot_product_attention` below groups the query heads per KV head.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qvjax import positions
from qvjax.layers import constrain, linear, out_std, param

Q_AXES = ('batch', 'length', 'act_heads', 'head_dim')
KV_AXES = ('batch', 'length', 'act_kv_heads', 'head_dim')


def attention_mask(segment_ids_BT):
  """Causal and within-document: (B, 1, T, T) booleans."""
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
  same_doc_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT & same_doc_BTT)[:, None]


def dot_product_attention(q_BTHd, k_BSGd, v_BSGd, bias_BHTS, mask_B1TS):
  """softmax(q k^T / sqrt(d) + bias, masked) v, query head h reading KV head
  h // (H / G); the op each backend runs fastest (docs/performance.md):

  - GPU, bfloat16/float16, no bias, T > 1: jax.nn.dot_product_attention with
    implementation='cudnn' (flash attention; its default, None, is XLA's).
  - CPU: the grouped einsums below. XLA:CPU runs them ~1.3x faster than
    jax.nn.dot_product_attention's XLA path (fwd+bwd, measured), which
    adds transposes around its vmap over the groups.
  - Elsewhere (TPU, float32 on GPU, decoding): jax.nn.dot_product_attention's
    XLA path. A Pallas splash-attention kernel for TPU is not wired in.
  """
  B, T, H, d = q_BTHd.shape
  backend = jax.default_backend()
  if (backend == 'gpu' and q_BTHd.dtype in (jnp.bfloat16, jnp.float16) and bias_BHTS is None
      and T > 1 and d <= 128 and d % 8 == 0):
    try:  # The causal + document mask goes in as a dense bias.
      return jax.nn.dot_product_attention(q_BTHd, k_BSGd, v_BSGd, mask=mask_B1TS,
                                          implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError):
      pass  # cuDNN refused these shapes or this GPU (checked while tracing): XLA below.
  if backend != 'cpu':  # Also GPU when cuDNN does not apply.
    return jax.nn.dot_product_attention(q_BTHd, k_BSGd, v_BSGd, bias=bias_BHTS,
                                        mask=mask_B1TS)
  S, G = k_BSGd.shape[1], k_BSGd.shape[2]
  q_BTGRd = q_BTHd.reshape(B, T, G, H // G, d)
  scores_BGRTS = jnp.einsum('btgrd,bsgd->bgrts', q_BTGRd, k_BSGd,
                            preferred_element_type=jnp.float32) * d ** -0.5
  if bias_BHTS is not None:
    bias_BGRTS = jnp.broadcast_to(bias_BHTS, (bias_BHTS.shape[0], H, T, S))
    scores_BGRTS = scores_BGRTS + bias_BGRTS.reshape(-1, G, H // G, T, S)
  scores_BGRTS = jnp.where(mask_B1TS[:, :, None], scores_BGRTS, jnp.finfo(jnp.float32).min)
  probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BSGd.dtype)
  out_BTGRd = jnp.einsum('bgrts,bsgd->btgrd', probs_BGRTS, v_BSGd)
  return out_BTGRd.reshape(B, T, H, d)


def heads_major(axes) -> bool:
  """Whether a cache array with these logical axes (B, S, heads, width) is
  stored heads-major, (B, heads, S, width): each head's slots contiguous, as
  the score and weighted-sum matmuls read them. Stored (B, S, heads, width),
  XLA:CPU transposed the whole cache at every decode step (~10x slower
  scores); the logical (B, S, ...) view is a transpose XLA folds into the dots."""
  return len(axes) == 4 and axes[2] == 'act_kv_heads'


def stored_axes(axes) -> tuple:
  return (axes[0], axes[2], axes[1], axes[3]) if heads_major(axes) else tuple(axes)


def slot_axis(axes) -> int:
  return 2 if heads_major(axes) else 1


def logical_view(cache, layout) -> dict:
  """The cache arrays as (B, S, ...), whatever their storage order."""
  return {name: a.transpose(0, 2, 1, 3) if heads_major(layout[name][1]) else a
          for name, a in cache.items()}


def write(cache, entries, index, layout):
  """Writes the new tokens' entries (B, T, ...) at slot `index` of each stored
  array, keeping the cache's dtype and activation-like sharding."""
  out = {}
  for name, array in cache.items():
    axes = layout[name][1]
    new = entries[name].astype(array.dtype)
    if heads_major(axes):
      new = new.transpose(0, 2, 1, 3)
    updated = jax.lax.dynamic_update_slice_in_dim(array, new, index, slot_axis(axes))
    out[name] = constrain(updated, stored_axes(axes))
  return out


class CachedAttention(nnx.Module):
  """Any paradigm: the forward pass and decoding, from what it caches.

  Subclasses define `cache_layout` (static), `cache_entries` and `attend`.
  """

  @staticmethod
  def cache_layout(cfg) -> dict:
    """name -> (per-token shape, logical axes of the (B, S, ...) cache array);
    per-head arrays are stored heads-major (see `heads_major`)."""
    raise NotImplementedError

  def cache_entries(self, x_BTD, positions_BT) -> dict:
    """What this paradigm caches for the tokens x: name -> (B, T, ...)."""
    raise NotImplementedError

  def attend(self, x_BTD, positions_BT, entries, kv_positions_BS, mask_B1TS):
    """x's queries against the keys/values that `entries` (B, S, ...) hold."""
    raise NotImplementedError

  def attend_cached(self, x_BTD, positions_BT, cache, kv_positions_BS, mask_B1TS):
    """Decoding's attention over the cache; MLA overrides it with its absorbed form."""
    return self.attend(x_BTD, positions_BT, cache, kv_positions_BS, mask_B1TS)

  def attention_probs(self, x_BTD, positions_BT, segment_ids_BT):
    """The softmax weights the forward pass uses, (B, H, T, T) float32: the
    same queries, keys, scale, position bias and mask, written out instead of
    fused. For inspection (qvjax.inspect); training never calls it."""
    raise NotImplementedError

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    entries = self.cache_entries(x_BTD, positions_BT)
    return self.attend(x_BTD, positions_BT, entries, positions_BT,
                       attention_mask(segment_ids_BT))

  def extend(self, x_BTD, positions_BT, cache, index, kv_positions_BS, mask_B1TS):
    """Writes x's entries at slots index, index+1, ... and attends over the
    whole cache (the mask hides slots not written yet). Returns (out, cache)."""
    layout = self.cache_layout(self.cfg)
    cache = write(cache, self.cache_entries(x_BTD, positions_BT), index, layout)
    view = logical_view(cache, layout)
    return self.attend_cached(x_BTD, positions_BT, view, kv_positions_BS, mask_B1TS), cache


class Attention(CachedAttention):
  """Head-based paradigms: subclasses define the cache and `keys_values`."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, d = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    self.w_q_DHd = param(rngs, (D, H, d), ('embed', 'heads', 'head_dim'), cfg.init_std)
    self.w_o_HdD = param(rngs, (H, d, D), ('heads', 'head_dim', 'embed'), out_std(cfg))
    self.agf_raw_H = positions.agf_param(cfg) if cfg.position == 'agf' else None

  def kv_param(self, rngs, width=None, std=None):
    """A (D, G, width) projection onto the key/value heads."""
    cfg = self.cfg
    shape = (cfg.emb_dim, cfg.num_kv_heads, width or cfg.head_dim)
    return param(rngs, shape, ('embed', 'kv_heads', 'head_dim'), std or cfg.init_std)

  def keys_values(self, entries, positions_BS, max_position=None):
    """Keys (position-encoded) and values, each (B, S, G, d), from entries.
    max_position, when known, bounds the positions (see positions.apply_rope);
    positions_BS None means slot s holds position s (decoding)."""
    raise NotImplementedError

  def attention_probs(self, x_BTD, positions_BT, segment_ids_BT):
    cfg, dt = self.cfg, x_BTD.dtype
    q_BTHd = jnp.einsum('btd,dhk->bthk', x_BTD, self.w_q_DHd[...].astype(dt))
    q_BTHd = positions.rotate(q_BTHd, positions_BT, cfg)
    k_BSGd, _ = self.keys_values(self.cache_entries(x_BTD, positions_BT), positions_BT)
    # Query head h reads KV head h // (H / G), as dot_product_attention groups them.
    k_BSHd = jnp.repeat(k_BSGd, cfg.num_heads // cfg.num_kv_heads, axis=2)
    scores_BHTS = jnp.einsum('bthk,bshk->bhts', q_BTHd, k_BSHd,
                             preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
    bias_BHTS = positions.bias(cfg, self.agf_raw_H, positions_BT, positions_BT)
    if bias_BHTS is not None:
      scores_BHTS = scores_BHTS + bias_BHTS
    scores_BHTS = jnp.where(attention_mask(segment_ids_BT), scores_BHTS,
                            jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BHTS, axis=-1)

  def attend_cached(self, x_BTD, positions_BT, cache, kv_positions_BS, mask_B1TS):
    return self.attend(x_BTD, positions_BT, cache, kv_positions_BS, mask_B1TS, decoding=True)

  def attend(self, x_BTD, positions_BT, entries, kv_positions_BS, mask_B1TS,
             decoding=False):
    """Queries of x against the keys/values rebuilt from `entries`.

    decoding: `entries` is a cache, in which slot s holds position s
    (qvjax.decode), so every position is below its S slots and rope reads
    sin/cos from a table, for the keys without even a gather: qv rotates the
    whole cached V at every step, where computing B x S x d sin/cos cost
    XLA:CPU more than the attention itself."""
    dt = x_BTD.dtype
    max_position = kv_positions_BS.shape[1] if decoding else None
    q_BTHd = linear(x_BTD, self.w_q_DHd[...].astype(dt))
    q_BTHd = constrain(positions.rotate(q_BTHd, positions_BT, self.cfg, max_position), Q_AXES)
    k_BSGd, v_BSGd = self.keys_values(entries, None if decoding else kv_positions_BS,
                                      max_position)
    k_BSGd, v_BSGd = constrain(k_BSGd, KV_AXES), constrain(v_BSGd, KV_AXES)
    bias_BHTS = positions.bias(self.cfg, self.agf_raw_H, positions_BT, kv_positions_BS)
    out_BTHd = dot_product_attention(q_BTHd, k_BSGd, v_BSGd, bias_BHTS, mask_B1TS)
    out_BTHd = constrain(out_BTHd, Q_AXES)
    return linear(out_BTHd, self.w_o_HdD[...].astype(dt), 2)

