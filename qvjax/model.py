"""The decoder: embed, pre-norm blocks (RMSNorm, attention, SwiGLU), norm, head.

`extend` runs the same blocks over a KV cache (qvjax.decode drives it).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from qvjax import positions
from qvjax.attention import make_attention
from qvjax.layers import RMSNorm, SwiGLU, constrain, linear, param

ACT_AXES = ('batch', 'length', 'act_embed')
# config.remat -> what jax.checkpoint may keep ('none' is no remat at all).
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
    self.attn = make_attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
    self.mlp = SwiGLU(cfg, rngs)

  def residual_mlp(self, x_BTD, attn_BTD):
    x_BTD = constrain(x_BTD + attn_BTD, ACT_AXES)
    return constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), ACT_AXES)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    return self.residual_mlp(x_BTD, self.attn(self.attn_norm(x_BTD), positions_BT,
                                              segment_ids_BT))

  def extend(self, x_BTD, positions_BT, cache, index, kv_positions_BS, mask_B1TS):
    attn_BTD, cache = self.attn.extend(self.attn_norm(x_BTD), positions_BT, cache, index,
                                       kv_positions_BS, mask_B1TS)
    return self.residual_mlp(x_BTD, attn_BTD), cache


class Decoder(nnx.Module):
  """Maps tokens (B, T) to float32 logits (B, T, V)."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    # Frozen: hashable, so it can live in the static graph definition.
    self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
    self.embed_VD = param(rngs, (cfg.vocab_size, cfg.emb_dim), ('vocab', 'embed'), 1.0)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.head_DV = param(rngs, (cfg.emb_dim, cfg.vocab_size), ('embed', 'vocab'),
                           cfg.init_std)

  def embed(self, tokens_BT, positions_BT):
    # Unit-variance embeddings scaled by 1/sqrt(D) going in; the tied head
    # then sees the same matrix at a sensible scale.
    scale = self.cfg.emb_dim ** -0.5
    x_BTD = self.embed_VD[...][tokens_BT] * scale
    if self.cfg.position == 'sinusoidal':
      # The same scale keeps Vaswani et al.'s ratio of position to token
      # signal (their embeddings are multiplied by sqrt(D), ours start at 1).
      x_BTD = x_BTD + positions.sinusoidal(positions_BT, self.cfg.emb_dim) * scale
    return constrain(x_BTD.astype(jnp.dtype(self.cfg.dtype)), ACT_AXES)

  def head(self):
    """The output projection (D, V), float32."""
    if self.cfg.tie_embeddings:
      return self.embed_VD[...].T * self.cfg.emb_dim ** -0.5
    return self.head_DV[...]

  def logits(self, x_BTD, head_DV=None):
    """float32 logits of the last block's output; `head_DV` = self.head(),
    passed in when it is reused (the chunked loss builds it once)."""
    x_BTD = self.final_norm(x_BTD)
    head_DV = self.head() if head_DV is None else head_DV
    logits_BTV = linear(x_BTD, head_DV.astype(x_BTD.dtype), 1, jnp.float32)
    return constrain(logits_BTV, ('batch', 'length', 'act_vocab'))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, remat: str = 'none'):
    return self.logits(self.features(tokens_BT, positions_BT, segment_ids_BT, remat))

  def features(self, tokens_BT, positions_BT=None, segment_ids_BT=None, remat: str = 'none'):
    """The last block's output (B, T, D), before the final norm and the head.

    remat (config.remat) chooses what the backward pass recomputes instead of
    storing, block by block: 'none' stores every activation; 'full' stores
    only each block's input; 'dots' stores the matmul outputs and recomputes
    the elementwise work (norms, softmax, SwiGLU's gate). Same function.
    """
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    x_BTD = self.embed(tokens_BT, positions_BT)
    run = lambda block, x, p, s: block(x, p, s)
    if remat != 'none':
      run = nnx.remat(run, policy=REMAT_POLICIES[remat])
    for block in self.blocks:
      x_BTD = run(block, x_BTD, positions_BT, segment_ids_BT)
    return x_BTD

  def extend(self, tokens_BT, positions_BT, caches, index, kv_positions_BS, mask_B1TS):
    """Runs tokens through the blocks against per-layer caches; (logits, caches)."""
    x_BTD = self.embed(tokens_BT, positions_BT)
    new_caches = []
    for block, cache in zip(self.blocks, caches):
      x_BTD, cache = block.extend(x_BTD, positions_BT, cache, index, kv_positions_BS, mask_B1TS)
      new_caches.append(cache)
    return self.logits(x_BTD), new_caches
