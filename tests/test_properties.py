"""Property-based checks over paradigms, position schemes and shapes
(hypothesis, derandomized so CI is repeatable): causality, batch-row
permutation, document masking, and finite outputs for extreme inputs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings, strategies as st

from configs import tiny
from qvjax.config import PARADIGMS, POSITIONS
from qvjax.model import Decoder

# Few examples each: every one builds a model and runs it eagerly.
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
TOL = dict(rtol=2e-5, atol=2e-5)


def build(attention, position, kv_heads=2):
  m = tiny.get_config().model
  m.attention, m.position, m.num_kv_heads = attention, position, kv_heads
  m.init_std = 0.2  # Sharp attention: leaks across positions would show.
  return Decoder(m, nnx.Rngs(0))


models = st.builds(build, st.sampled_from(PARADIGMS), st.sampled_from(POSITIONS),
                   st.sampled_from([1, 2, 4]))


def tokens(seed, batch, length, vocab=512):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


@SETTINGS
@given(model=models, length=st.sampled_from([2, 9, 32]), cut=st.integers(0, 31),
       seed=st.integers(0, 99))
def test_a_token_never_influences_earlier_logits(model, length, cut, seed):
  cut = cut % length
  x = tokens(seed, 1, length)
  y = x.at[0, cut:].set((x[0, cut:] + 7) % 512)
  np.testing.assert_allclose(model(x)[:, :cut], model(y)[:, :cut], **TOL)


@SETTINGS
@given(model=models, seed=st.integers(0, 99))
def test_batch_rows_are_independent(model, seed):
  x = tokens(seed, 4, 12)
  perm = np.random.default_rng(seed).permutation(4)
  np.testing.assert_allclose(model(x)[perm], model(x[perm]), **TOL)


@SETTINGS
@given(model=models, first=st.integers(1, 15), seed=st.integers(0, 99))
def test_other_documents_and_padding_do_not_change_a_documents_logits(model, first, seed):
  x = tokens(seed, 1, 16)
  seg = jnp.array([[1] * first + [0] * (16 - first)])  # The rest is padding (segment 0).
  pos = jnp.array([list(range(first)) + [0] * (16 - first)])
  alone = model(x[:, :first])
  packed = model(x, pos, seg)
  other = model(x.at[0, first:].set(3), pos, seg)
  np.testing.assert_allclose(packed[:, :first], alone, **TOL)
  np.testing.assert_allclose(other[:, :first], alone, **TOL)


@SETTINGS
@given(model=models, case=st.sampled_from(['all padding', 'one repeated token', 'full length']))
def test_outputs_stay_finite_on_extreme_inputs(model, case):
  length = tiny.get_config().seq_len
  x = tokens(0, 2, length)
  pos = jnp.broadcast_to(jnp.arange(length), x.shape)
  seg = jnp.ones_like(x)
  if case == 'all padding':
    x, seg, pos = jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros_like(x)
  elif case == 'one repeated token':
    x = jnp.full_like(x, 5)
  assert bool(jnp.all(jnp.isfinite(model(x, pos, seg))))
