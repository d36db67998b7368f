"""Position schemes that act inside attention.

RoPE rotates pairs of channels (first half with second half, the Llama/NeoX
layout) by an angle proportional to the token's position within its document.
"""

import jax.numpy as jnp


def apply_rope(x_BTNd, positions_BT, theta: float):
  """Rotates the last axis of x by each token's position; dtype is kept."""
  d = x_BTNd.shape[-1]
  half = d // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / d)
  angles_BTf = positions_BT[..., None].astype(jnp.float32) * freqs
  sin = jnp.sin(angles_BTf)[:, :, None, :]
  cos = jnp.cos(angles_BTf)[:, :, None, :]
  x1 = x_BTNd[..., :half].astype(jnp.float32)
  x2 = x_BTNd[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNd.dtype)


def rotate(x_BTNd, positions_BT, cfg):
  """Applies cfg.position to a query or key-role tensor (identity for 'none')."""
  if cfg.position == 'rope':
    return apply_rope(x_BTNd, positions_BT, cfg.rope_theta)
  return x_BTNd
