"""Standard attention: K = x W_K, V = x W_V. G = H is MHA, G = 1 MQA, else GQA."""

import jax.numpy as jnp

from qvjax import positions
from qvjax.attention.base import Attention


class QKVAttention(Attention):

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)
    self.w_k_DGd = self.kv_param(rngs)
    self.w_v_DGd = self.kv_param(rngs)

  def keys_values(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    k_BTGd = jnp.einsum('btd,dgk->btgk', x_BTD, self.w_k_DGd[...].astype(dt))
    v_BTGd = jnp.einsum('btd,dgk->btgk', x_BTD, self.w_v_DGd[...].astype(dt))
    return positions.rotate(k_BTGd, positions_BT, self.cfg), v_BTGd
