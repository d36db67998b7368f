"""Small building blocks shared by the model and every attention paradigm.

Parameters carry logical axis names (`out_sharding`); qvjax.sharding maps them
onto the mesh. Eager sharding is off so that a model can be built with or
without a mesh: placement happens once, at the jitted init's out_shardings.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen, nnx


def param(rngs: nnx.Rngs, shape, names, std: float) -> nnx.Param:
  """A normally initialised parameter annotated with logical axis names."""
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _contract(x, w, n_in: int, out_dtype=None):
  """x (..., K1..Kn) . w (K1..Kn, N1..Nm) over the n_in shared axes."""
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                    ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x, w, n_in: int = 1, out_dtype=None):
  """A projection: contracts x's last n_in axes with w's first n_in axes.

  The same function as the einsum it replaces. Only its gradient differs, in
  operand order: the weight gradient sum_rows x^T g needs one operand
  transposed (matmul kernels want the contracted axis innermost), and XLA
  transposes the one that matches the weight's layout, even when it is the
  wider one (the MLP's F = 3D activations, the logits' V columns). Here the
  narrower of x and g is transposed and the small (K, N) result flipped:
  on XLA:CPU this cut an MLP's fwd+bwd time by a quarter (docs/performance.md).
  out_dtype: the result's dtype (e.g. float32 logits from bfloat16 inputs).
  """
  return _contract(x, w, n_in, out_dtype)


def _linear_fwd(x, w, n_in, out_dtype):
  return _contract(x, w, n_in, out_dtype), (x, w)


def _linear_bwd(n_in, out_dtype, residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)  # Gradients flow in the compute dtype, as for an einsum.
  k_shape, n_shape = w.shape[:n_in], w.shape[n_in:]
  K, N = math.prod(k_shape), math.prod(n_shape)
  # Rows (every leading axis of x) flattened; sharded leading axes merge fine.
  x_MK = x.reshape(-1, K)
  g_MN = g.reshape(-1, N)
  dx = jax.lax.dot_general(g_MN, w.reshape(K, N).astype(g.dtype), (((1,), (1,)), ((), ())))
  if N < K:
    dw_KN = jax.lax.dot_general(g_MN, x_MK, (((0,), (0,)), ((), ()))).T
  else:
    dw_KN = jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())))
  return dx.reshape(x.shape).astype(x.dtype), dw_KN.reshape(w.shape).astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


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
    gate_BTF = linear(x_BTD, self.w_gate_DF[...].astype(dt))
    up_BTF = linear(x_BTD, self.w_up_DF[...].astype(dt))
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ('batch', 'length', 'act_mlp'))
    return linear(h_BTF, self.w_down_FD[...].astype(dt))


def out_std(cfg) -> float:
  """Residual-branch output projections start smaller (GPT-2) so depth stays stable."""
  return cfg.init_std / (2 * cfg.num_layers) ** 0.5
