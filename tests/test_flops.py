"""The per-paradigm FLOPs formulas (qvjax.metrics) against XLA's own count
of a compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import tiny
from qvjax import metrics
from qvjax.model import Decoder


@pytest.mark.parametrize('attention', ['qkv', 'qv', 'qv_ka', 'mla', 'mla_qv'])
def test_flops_formulas_match_xla_cost_analysis(attention):
  """XLA counts every matmul (2 per multiply-add) plus elementwise work the
  formulas leave out (norms, softmax, rope: ~1% at these widths). Each term
  of each formula is >= 3% of the total here, so a missing or doubled term
  falls outside [1.0, 1.02]. XLA scores the full T x T square: causal=False."""
  m = tiny.get_config().model
  m.update(attention=attention, num_layers=1, emb_dim=256, num_heads=4, num_kv_heads=2,
           head_dim=64, mlp_dim=256, vocab_size=256)
  m.qv_ka.ctx_dim = 64
  m.mla.update(kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
               q_lora_rank=96 if attention == 'mla' else 0)
  graphdef, state = nnx.split(Decoder(m, nnx.Rngs(0)))
  T = 32
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  cost = forward.lower(state, jnp.zeros((1, T), jnp.int32)).compile().cost_analysis()
  formula = metrics.forward_flops_per_token(m, T, causal=False) * T
  assert 1.0 <= cost['flops'] / formula <= 1.02, (cost['flops'], formula)
  # Causal counting halves exactly the attention term.
  assert (metrics.forward_flops_per_token(m, T, causal=False)
          - metrics.forward_flops_per_token(m, T)) == metrics.attention_flops_per_token(m, T)
