"""Position schemes (config `model.position`), all driven by each token's
position within its document:

  rope        rotates queries and key-role tensors (never the summed values)
  alibi       bias  -m_h * (i - j)               fixed slopes m_h (Press et al.)
  agf         bias  -alpha_h * log(1 + (i - j))  learnable alpha_h >= 0
  sinusoidal  absolute sin/cos added to the token embeddings (model.py)
  none        nothing: only the causal mask orders tokens

i is the query's position, j the key's. `agf` is OUR READING of the paper's
AGF (arXiv 2603.04805, known to us second-hand only): a power-law attention
weight (1 + i - j) ** -alpha_h, i.e. KERPLE's log kernel with its inner scale
fixed at 1. alpha_h = softplus(raw_h), so it stays >= 0 whatever the
optimiser does; heads start log-spaced between model.agf.init_max and
model.agf.init_min, some local and some nearly position-free, as ALiBi's
slopes are.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvjax.config import POSITIONS  # noqa: F401  (the scheme names, re-exported)

BIASES = ('alibi', 'agf')


# Largest rope table (positions x head width) built on the host; beyond it,
# sin/cos are computed on the device.
MAX_TABLE = 1 << 22


@functools.lru_cache(maxsize=32)
def rope_table(positions: int, d: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """([cos, cos], [-sin, sin]) for positions 0 .. positions-1, (positions, d)
  float32, computed in float64 on the host."""
  half = d // 2
  angles = np.arange(positions)[:, None] * theta ** (-np.arange(half) * 2 / d)
  cos, sin = np.cos(angles), np.sin(angles)
  return (np.concatenate([cos, cos], -1).astype(np.float32),
          np.concatenate([-sin, sin], -1).astype(np.float32))


def apply_rope(x_BTNd, positions_BT, theta: float, max_position: int | None = None):
  """Rotates the last axis of x by each token's position; dtype is kept.
  Pairs channel k with k + d/2 (Llama's rotate_half layout).

  max_position: a bound on the positions (exclusive), when the caller knows
  one (decoding: the cache's slot count). sin/cos then come from a
  host-computed table instead of being computed per token. positions_BT None
  (with max_position) means token t is at position t.
  """
  d = x_BTNd.shape[-1]
  half = d // 2
  if max_position and max_position * d <= MAX_TABLE:
    cos_table, sin_table = rope_table(int(max_position), d, float(theta))
    if positions_BT is None:
      T = x_BTNd.shape[1]
      cos_BT1d = jnp.asarray(cos_table[:T])[None, :, None, :]
      sin_BT1d = jnp.asarray(sin_table[:T])[None, :, None, :]
    else:
      cos_BT1d = jnp.asarray(cos_table)[positions_BT][:, :, None, :]
      sin_BT1d = jnp.asarray(sin_table)[positions_BT][:, :, None, :]
  else:
    if positions_BT is None:
      positions_BT = jnp.arange(x_BTNd.shape[1])[None]
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / d)
    angles_BTf = positions_BT[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BTf), jnp.cos(angles_BTf)
    # out = x * [cos, cos] + swap_halves(x) * [-sin, sin]: one elementwise
    # pass whose gradient is one too (slices and a concatenate of x cost pads
    # and copies in the backward pass).
    cos_BT1d = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
    sin_BT1d = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
  x = x_BTNd.astype(jnp.float32)
  swapped = jnp.flip(x.reshape(x.shape[:-1] + (2, half)), axis=-2).reshape(x.shape)
  return (x * cos_BT1d + swapped * sin_BT1d).astype(x_BTNd.dtype)


def rotate(x_BTNd, positions_BT, cfg, max_position: int | None = None):
  """Applies RoPE when cfg.position is 'rope'; every other scheme leaves
  queries and keys alone (they act on the scores or the embeddings)."""
  if cfg.position == 'rope':
    return apply_rope(x_BTNd, positions_BT, cfg.rope_theta, max_position)
  return x_BTNd


def sinusoidal(positions_BT, dim: int):
  """Vaswani et al.'s table: channel 2k is sin(p / 10000^(2k/D)), 2k+1 the cos."""
  k = np.arange(dim)
  freqs = 10_000.0 ** (-(k // 2) * 2 / dim)
  angles_BTD = positions_BT[..., None].astype(jnp.float32) * freqs
  return jnp.where(k % 2 == 0, jnp.sin(angles_BTD), jnp.cos(angles_BTD))


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's geometric slopes 2^(-8/n), 2^(-16/n), ...; for a head count that
  is not a power of two, the reference code's interleaving of the next one."""
  def powers(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  n = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = powers(n) + powers(2 * n)[0::2][:num_heads - n]
  return np.asarray(slopes, np.float32)


def agf_param(cfg) -> nnx.Param:
  """The raw (pre-softplus) per-head AGF exponents of one layer."""
  alphas = np.geomspace(cfg.agf.init_max, cfg.agf.init_min, cfg.num_heads)
  raw = np.log(np.expm1(alphas))  # softplus^-1
  return nnx.Param(jnp.asarray(raw, jnp.float32), out_sharding=('heads',),
                   eager_sharding=False)


def bias(cfg, agf_raw_H, q_positions_BT, kv_positions_BS):
  """The (B, H, T, S) float32 score bias of alibi/agf; None for other schemes.
  Distances are clipped at 0: pairs with j > i are masked anyway."""
  if cfg.position not in BIASES:
    return None
  dist_BTS = (q_positions_BT[:, :, None] - kv_positions_BS[:, None, :]).astype(jnp.float32)
  dist_B1TS = jnp.maximum(dist_BTS, 0.0)[:, None]
  if cfg.position == 'alibi':
    return -jnp.asarray(alibi_slopes(cfg.num_heads))[None, :, None, None] * dist_B1TS
  alpha_H = jax.nn.softplus(agf_raw_H[...])
  return -alpha_H[None, :, None, None] * jnp.log1p(dist_B1TS)
