"""MLA towards QV (the paper's proposed trajectory): MLA without W_UK.

The content key of head h is the value itself, c W_UV_h, so
  scores = (q_nope_h . c W_UV_h + RoPE(q_rope_h) . k_rope) / sqrt(e + p)
with q_nope of width e = v_head_dim (config: qk_nope_head_dim must equal
v_head_dim). The cache is MLA's: the latent c and the rope key, r + p numbers
per token and layer; decoding absorbs W_UV into the query as MLA absorbs W_UK.
As in qv, position never reaches the summed values: only the decoupled rope
channels are rotated.
"""

from qvjax.attention.mla import MLAttention


class MLAQVAttention(MLAttention):
  KEY_FROM_VALUE = True
