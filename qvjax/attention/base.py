"""What every paradigm shares: the query and output projections, the mask,
and the attention op. A paradigm only says how it makes keys and values.

Shapes: x (B, T, D); H query heads of width d; G key/value heads, each serving
H/G query heads. GQA is never computed by repeating K/V:
`jax.nn.dot_product_attention` groups the query heads per KV head itself
(and picks cuDNN flash attention on GPU, XLA on CPU).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qvjax import positions
from qvjax.layers import constrain, out_std, param

Q_AXES = ('batch', 'length', 'act_heads', 'head_dim')
KV_AXES = ('batch', 'length', 'act_kv_heads', 'head_dim')


def attention_mask(segment_ids_BT):
  """Causal and within-document: (B, 1, T, T) booleans."""
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
  same_doc_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT & same_doc_BTT)[:, None]


class Attention(nnx.Module):
  """Base class: subclasses implement `keys_values(x, positions)`."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, d = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    self.w_q_DHd = param(rngs, (D, H, d), ('embed', 'heads', 'head_dim'), cfg.init_std)
    self.w_o_HdD = param(rngs, (H, d, D), ('heads', 'head_dim', 'embed'), out_std(cfg))

  def kv_param(self, rngs, width=None, std=None):
    """A (D, G, width) projection onto the key/value heads."""
    cfg = self.cfg
    shape = (cfg.emb_dim, cfg.num_kv_heads, width or cfg.head_dim)
    return param(rngs, shape, ('embed', 'kv_heads', 'head_dim'), std or cfg.init_std)

  def keys_values(self, x_BTD, positions_BT):
    """Returns (keys, values), each (B, T, G, d); keys already position-encoded."""
    raise NotImplementedError

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    dt = x_BTD.dtype
    q_BTHd = jnp.einsum('btd,dhk->bthk', x_BTD, self.w_q_DHd[...].astype(dt))
    q_BTHd = constrain(positions.rotate(q_BTHd, positions_BT, self.cfg), Q_AXES)
    k_BTGd, v_BTGd = self.keys_values(x_BTD, positions_BT)
    k_BTGd, v_BTGd = constrain(k_BTGd, KV_AXES), constrain(v_BTGd, KV_AXES)
    out_BTHd = jax.nn.dot_product_attention(
        q_BTHd, k_BTGd, v_BTGd, mask=attention_mask(segment_ids_BT))
    out_BTHd = constrain(out_BTHd, Q_AXES)
    return jnp.einsum('bthk,hkd->btd', out_BTHd, self.w_o_HdD[...].astype(dt))
