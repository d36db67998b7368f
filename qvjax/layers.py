"""Small building blocks shared by the model and every attention paradigm.

Parameters carry logical axis names (`out_sharding`); qvjax.sharding maps them
onto the mesh. Eager sharding is off so that a model can be built with or
without a mesh: placement happens once, at the jitted init's out_shardings.
"""

import jax
import jax.numpy as jnp
from flax import linen, nnx


def param(rngs: nnx.Rngs, shape, names, std: float) -> nnx.Param:
  """A normally initialised parameter annotated with logical axis names."""
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def constrain(x, names):
  """Pins an activation's sharding by logical names (no-op without rules)."""
  return linen.with_logical_constraint(x, tuple(names))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=('norm',),
                           eager_sharding=False)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    D, F = cfg.emb_dim, cfg.mlp_dim
    self.w_gate_DF = param(rngs, (D, F), ('embed', 'mlp'), cfg.init_std)
    self.w_up_DF = param(rngs, (D, F), ('embed', 'mlp'), cfg.init_std)
    self.w_down_FD = param(rngs, (F, D), ('mlp', 'embed'), out_std(cfg))

  def __call__(self, x_BTD):
    dt = x_BTD.dtype
    gate_BTF = x_BTD @ self.w_gate_DF[...].astype(dt)
    up_BTF = x_BTD @ self.w_up_DF[...].astype(dt)
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ('batch', 'length', 'act_mlp'))
    return h_BTF @ self.w_down_FD[...].astype(dt)


def out_std(cfg) -> float:
  """Residual-branch output projections start smaller (GPT-2) so depth stays stable."""
  return cfg.init_std / (2 * cfg.num_layers) ** 0.5
