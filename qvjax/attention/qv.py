"""QV (the paper's paradigm): no W_K; the value plays the key's role.

scores = q . v / sqrt(d). Positions rotate a key-role copy of v; the values
that are summed stay unrotated, so position never leaks into the output.
The cache holds V only (G d numbers per token and layer: half of QKV's at the
same KV head count); decoding re-rotates the cached values into keys at each
step, an elementwise cost paid for the halved memory.
"""

from qvjax import positions
from qvjax.attention.base import KV_AXES, Attention
from qvjax.layers import linear


class QVAttention(Attention):

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)
    self.w_v_DGd = self.kv_param(rngs)

  @staticmethod
  def cache_layout(cfg):
    return {'v': ((cfg.num_kv_heads, cfg.head_dim), KV_AXES)}

  def cache_entries(self, x_BTD, positions_BT):
    return {'v': linear(x_BTD, self.w_v_DGd[...].astype(x_BTD.dtype))}

  def keys_values(self, entries, positions_BS, max_position=None):
    v_BSGd = entries['v']
    return positions.rotate(v_BSGd, positions_BS, self.cfg, max_position), v_BSGd
