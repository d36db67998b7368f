"""QV-Ka ("key after value & ctx"): the key is rebuilt from the value and a
small context vector of the layer's (normalised) input.

  g = x W_ctx            (B, T, G, c)   c = model.qv_ka.ctx_dim, 0 allowed
  k = [g ; v] W_K        W_K per KV head: (c + d) -> d
With c = 0 and W_K = I this is exactly QV. Reading "ctx" as the layer input is
our choice where the paper is silent (docs/attention.md). W_K starts with a
variance-preserving normal init (std 1/sqrt(c + d)) so k has v's scale.
"""

import jax.numpy as jnp

from qvjax import positions
from qvjax.attention.base import Attention
from qvjax.layers import param


class QVKaAttention(Attention):

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)
    c, d, G = cfg.qv_ka.ctx_dim, cfg.head_dim, cfg.num_kv_heads
    self.w_v_DGd = self.kv_param(rngs)
    self.w_ctx_DGc = self.kv_param(rngs, width=c) if c else None
    self.w_k_Gid = param(rngs, (G, c + d, d), ('kv_heads', 'ka_in', 'head_dim'),
                         (c + d) ** -0.5)

  def keys_values(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    v_BTGd = jnp.einsum('btd,dgk->btgk', x_BTD, self.w_v_DGd[...].astype(dt))
    key_in = v_BTGd
    if self.w_ctx_DGc is not None:
      g_BTGc = jnp.einsum('btd,dgc->btgc', x_BTD, self.w_ctx_DGc[...].astype(dt))
      key_in = jnp.concatenate([g_BTGc, v_BTGd], axis=-1)
    k_BTGd = jnp.einsum('btgi,gik->btgk', key_in, self.w_k_Gid[...].astype(dt))
    return positions.rotate(k_BTGd, positions_BT, self.cfg), v_BTGd
