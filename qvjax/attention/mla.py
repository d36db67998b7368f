"""MLA: DeepSeek-V2's multi-head latent attention.

Per token (r = kv_lora_rank, n = qk_nope_head_dim, p = qk_rope_head_dim,
e = v_head_dim, q = q_lora_rank):
  queries   [q_nope ; q_rope]_h = x W_Q  (q = 0)  or  RMSNorm(x W_DQ) W_UQ
  latent    c = RMSNorm(x W_DKV)                                       (r)
  rope key  k_rope = RoPE(x W_KR), one for all heads (decoupled)       (p)
  keys      k_h = [c W_UK_h ; k_rope],  values v_h = c W_UV_h
  scores    (q_nope_h . c W_UK_h + RoPE(q_rope_h) . k_rope) / sqrt(n + p)
The cache holds c and k_rope: r + p numbers per token and layer.

Training runs the naive form above (keys and values expanded per head).
Decoding runs the absorbed form: W_UK folds into the query
(q_nope_h W_UK_h^T is scored against c itself) and W_UV is applied after the
weighted sum of latents, so the cache is never expanded.

Positions: with model.position = 'rope' the decoupled channels q_rope/k_rope
are rotated (DeepSeek-V2 exactly). Any other scheme leaves them unrotated, as
a plain shared key of width p (set p = 0 to drop it), and acts as it does
for every paradigm: alibi/agf bias the scores, sinusoidal is added to the
embeddings. model.head_dim and model.num_kv_heads are not used by MLA.
"""

import jax
import jax.numpy as jnp

from qvjax import positions
from qvjax.attention.base import Q_AXES, CachedAttention, attention_mask
from qvjax.layers import RMSNorm, constrain, linear, out_std, param

# The latent axes (r and q) are never split (logical name None): they are
# narrow and every head reads all of them.
LATENT_AXES = ('batch', 'length', None)
ROPE_KEY_AXES = ('batch', 'length', 'head_dim')


class MLAttention(CachedAttention):

  # mla_qv sets this: the content key is then c W_UV, there is no W_UK.
  KEY_FROM_VALUE = False
  absorb = True  # Decoding's form (see attend_cached).

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    m, D, H, std = cfg.mla, cfg.emb_dim, cfg.num_heads, cfg.init_std
    n, p, e, r, q = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank,
                     m.q_lora_rank)
    if q:
      self.w_dq_DQ = param(rngs, (D, q), ('embed', None), std)
      self.q_norm = RMSNorm(q, cfg.norm_eps)
      self.w_uq_QHk = param(rngs, (q, H, n + p), ('latent', 'heads', 'head_dim'), std)
    else:
      self.w_q_DHk = param(rngs, (D, H, n + p), ('embed', 'heads', 'head_dim'), std)
    self.w_dkv_DC = param(rngs, (D, r), ('embed', None), std)
    self.kv_norm = RMSNorm(r, cfg.norm_eps)
    self.w_kr_DP = param(rngs, (D, p), ('embed', 'head_dim'), std) if p else None
    self.w_uk_CHn = None if self.KEY_FROM_VALUE else param(
        rngs, (r, H, n), ('latent', 'heads', 'head_dim'), std)
    self.w_uv_CHe = param(rngs, (r, H, e), ('latent', 'heads', 'head_dim'), std)
    self.w_o_HeD = param(rngs, (H, e, D), ('heads', 'head_dim', 'embed'), out_std(cfg))
    self.agf_raw_H = positions.agf_param(cfg) if cfg.position == 'agf' else None

  @staticmethod
  def cache_layout(cfg):
    layout = {'latent': ((cfg.mla.kv_lora_rank,), LATENT_AXES)}
    if cfg.mla.qk_rope_head_dim:
      layout['k_rope'] = ((cfg.mla.qk_rope_head_dim,), ROPE_KEY_AXES)
    return layout

  def key_up(self):
    """The (r, H, n) map from the latent to each head's content key."""
    return (self.w_uv_CHe if self.KEY_FROM_VALUE else self.w_uk_CHn)[...]

  def cache_entries(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    entries = {'latent': self.kv_norm(linear(x_BTD, self.w_dkv_DC[...].astype(dt)))}
    if self.w_kr_DP is not None:
      k_rope_BT1P = linear(x_BTD, self.w_kr_DP[...].astype(dt))[:, :, None]
      entries['k_rope'] = positions.rotate(k_rope_BT1P, positions_BT, self.cfg)[:, :, 0]
    return entries

  def queries(self, x_BTD, positions_BT):
    """(q_nope, q_rope), (B, T, H, n) and (B, T, H, p), q_rope position-encoded."""
    dt = x_BTD.dtype
    if self.cfg.mla.q_lora_rank:
      c_q_BTQ = self.q_norm(linear(x_BTD, self.w_dq_DQ[...].astype(dt)))
      q_BTHk = linear(c_q_BTQ, self.w_uq_QHk[...].astype(dt))
    else:
      q_BTHk = linear(x_BTD, self.w_q_DHk[...].astype(dt))
    q_BTHk = constrain(q_BTHk, Q_AXES)
    n = self.cfg.mla.qk_nope_head_dim
    return q_BTHk[..., :n], positions.rotate(q_BTHk[..., n:], positions_BT, self.cfg)

  def probs(self, scores_BHTS, positions_BT, kv_positions_BS, mask_B1TS):
    """Scaled, biased, masked softmax in float32."""
    m = self.cfg.mla
    scores_BHTS = scores_BHTS * (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    bias_BHTS = positions.bias(self.cfg, self.agf_raw_H, positions_BT, kv_positions_BS)
    if bias_BHTS is not None:
      scores_BHTS = scores_BHTS + bias_BHTS
    scores_BHTS = jnp.where(mask_B1TS, scores_BHTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BHTS, axis=-1)

  def rope_scores(self, q_rope_BTHP, entries):
    if 'k_rope' not in entries:
      return 0.0
    return jnp.einsum('bthp,bsp->bhts', q_rope_BTHP, entries['k_rope'],
                      preferred_element_type=jnp.float32)

  def output(self, out_BTHe):
    out_BTHe = constrain(out_BTHe, Q_AXES)
    return linear(out_BTHe, self.w_o_HeD[...].astype(out_BTHe.dtype), 2)

  def attend(self, x_BTD, positions_BT, entries, kv_positions_BS, mask_B1TS):
    """Naive form: per-head keys and values expanded from the latents."""
    dt = x_BTD.dtype
    q_nope_BTHn, q_rope_BTHP = self.queries(x_BTD, positions_BT)
    c_BSC = entries['latent']
    v_BSHe = constrain(linear(c_BSC, self.w_uv_CHe[...].astype(dt)), Q_AXES)
    # mla_qv reuses v as its key: expanding c W_UV twice made XLA:CPU's
    # train step ~1.7x slower.
    k_nope_BSHn = v_BSHe if self.KEY_FROM_VALUE else constrain(
        linear(c_BSC, self.w_uk_CHn[...].astype(dt)), Q_AXES)
    scores_BHTS = jnp.einsum('bthn,bshn->bhts', q_nope_BTHn, k_nope_BSHn,
                             preferred_element_type=jnp.float32)
    scores_BHTS = scores_BHTS + self.rope_scores(q_rope_BTHP, entries)
    probs_BHTS = self.probs(scores_BHTS, positions_BT, kv_positions_BS, mask_B1TS)
    return self.output(jnp.einsum('bhts,bshe->bthe', probs_BHTS.astype(dt), v_BSHe))

  def attention_probs(self, x_BTD, positions_BT, segment_ids_BT):
    """The naive form's softmax weights, (B, H, T, T) float32 (for inspection)."""
    dt = x_BTD.dtype
    entries = self.cache_entries(x_BTD, positions_BT)
    q_nope_BTHn, q_rope_BTHP = self.queries(x_BTD, positions_BT)
    k_nope_BSHn = jnp.einsum('bsc,chn->bshn', entries['latent'], self.key_up().astype(dt))
    scores_BHTS = jnp.einsum('bthn,bshn->bhts', q_nope_BTHn, k_nope_BSHn,
                             preferred_element_type=jnp.float32)
    scores_BHTS = scores_BHTS + self.rope_scores(q_rope_BTHP, entries)
    return self.probs(scores_BHTS, positions_BT, positions_BT, attention_mask(segment_ids_BT))

  def attend_cached(self, x_BTD, positions_BT, cache, kv_positions_BS, mask_B1TS):
    """Absorbed form: scores and the weighted sum act on the latents directly.
    With `absorb` set False on the module (the benchmark's comparison), the
    naive form instead, expanding every cached latent per head at every step."""
    if not self.absorb:
      return self.attend(x_BTD, positions_BT, cache, kv_positions_BS, mask_B1TS)
    dt = x_BTD.dtype
    q_nope_BTHn, q_rope_BTHP = self.queries(x_BTD, positions_BT)
    c_BSC = cache['latent']
    q_lat_BTHC = jnp.einsum('bthn,chn->bthc', q_nope_BTHn, self.key_up().astype(dt))
    scores_BHTS = jnp.einsum('bthc,bsc->bhts', q_lat_BTHC, c_BSC,
                             preferred_element_type=jnp.float32)
    scores_BHTS = scores_BHTS + self.rope_scores(q_rope_BTHP, cache)
    probs_BHTS = self.probs(scores_BHTS, positions_BT, kv_positions_BS, mask_B1TS)
    lat_BTHC = jnp.einsum('bhts,bsc->bthc', probs_BHTS.astype(dt), c_BSC)
    return self.output(jnp.einsum('bthc,che->bthe', lat_BTHC, self.w_uv_CHe[...].astype(dt)))
