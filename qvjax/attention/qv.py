"""QV (the paper's paradigm): no W_K; the value plays the key's role.

scores = q . v / sqrt(d). Positions rotate a key-role copy of v; the values
that are summed stay unrotated, so position never leaks into the output.
The cache needs V only: half of QKV's at the same KV head count.
"""

import jax.numpy as jnp

from qvjax import positions
from qvjax.attention.base import Attention


class QVAttention(Attention):

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)
    self.w_v_DGd = self.kv_param(rngs)

  def keys_values(self, x_BTD, positions_BT):
    v_BTGd = jnp.einsum('btd,dgk->btgk', x_BTD, self.w_v_DGd[...].astype(x_BTD.dtype))
    return positions.rotate(v_BTGd, positions_BT, self.cfg), v_BTGd
