"""QV-Ka ("key after value & ctx"): the key is rebuilt from the value and a
small context vector of the layer's (normalised) input.

  g = x W_ctx            (B, T, G, c)   c = model.qv_ka.ctx_dim, 0 allowed
  k = [g ; v] W_K        W_K per KV head: (c + d) -> d
With c = 0 and W_K = I this is exactly QV. Reading "ctx" as the layer input is
our choice where the paper is silent (docs/attention.md). W_K starts with a
variance-preserving normal init (std 1/sqrt(c + d)) so k has v's scale.

The cache holds v and g, G (d + c) numbers per token and layer; decoding
rebuilds K from them at every step (2 G (c + d) d FLOPs per cached token),
trading compute for memory as the paper proposes.
"""

import jax.numpy as jnp

from qvjax import positions
from qvjax.attention.base import KV_AXES, Attention
from qvjax.layers import linear, param


class QVKaAttention(Attention):

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)
    c, d, G = cfg.qv_ka.ctx_dim, cfg.head_dim, cfg.num_kv_heads
    self.w_v_DGd = self.kv_param(rngs)
    self.w_ctx_DGc = self.kv_param(rngs, width=c) if c else None
    self.w_k_Gid = param(rngs, (G, c + d, d), ('kv_heads', 'ka_in', 'head_dim'),
                         (c + d) ** -0.5)

  @staticmethod
  def cache_layout(cfg):
    G, c = cfg.num_kv_heads, cfg.qv_ka.ctx_dim
    layout = {'v': ((G, cfg.head_dim), KV_AXES)}
    if c:
      layout['ctx'] = ((G, c), KV_AXES)
    return layout

  def cache_entries(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    entries = {'v': linear(x_BTD, self.w_v_DGd[...].astype(dt))}
    if self.w_ctx_DGc is not None:
      entries['ctx'] = linear(x_BTD, self.w_ctx_DGc[...].astype(dt))
    return entries

  def keys_values(self, entries, positions_BS, max_position=None):
    v_BSGd = entries['v']
    key_in = v_BSGd
    if 'ctx' in entries:
      key_in = jnp.concatenate([entries['ctx'], v_BSGd], axis=-1)
    k_BSGd = jnp.einsum('bsgi,gik->bsgk', key_in, self.w_k_Gid[...].astype(v_BSGd.dtype))
    return positions.rotate(k_BSGd, positions_BS, self.cfg, max_position), v_BSGd
