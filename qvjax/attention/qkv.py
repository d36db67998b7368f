"""Standard attention: K = x W_K, V = x W_V. G = H is MHA, G = 1 MQA, else GQA.

Cache per token and layer: the rotated key and the value, 2 G d numbers.
"""

from qvjax import positions
from qvjax.attention.base import KV_AXES, Attention
from qvjax.layers import linear


class QKVAttention(Attention):

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)
    self.w_k_DGd = self.kv_param(rngs)
    self.w_v_DGd = self.kv_param(rngs)

  @staticmethod
  def cache_layout(cfg):
    shape = (cfg.num_kv_heads, cfg.head_dim)
    return {'k': (shape, KV_AXES), 'v': (shape, KV_AXES)}

  def cache_entries(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    k_BTGd = linear(x_BTD, self.w_k_DGd[...].astype(dt))
    v_BTGd = linear(x_BTD, self.w_v_DGd[...].astype(dt))
    # Keys are rotated once, at their own position, before they are cached.
    return {'k': positions.rotate(k_BTGd, positions_BT, self.cfg), 'v': v_BTGd}

  def keys_values(self, entries, positions_BS, max_position=None):
    return entries['k'], entries['v']
