"""How fast can QV's decode attention be under XLA? One decode step's
attention (T = 1, all layers' caches, no projections) written several ways:

    python -m qvjax.bench_decode_forms [--batch=8 --context=4096 --kv_heads=4 --head_dim=64 --layers=4]

QV caches V only (half of QKV's bytes), but RoPE rotates the key role, so a
step must turn the cached V into keys (qvjax/attention/qv.py). Each layer of
a step writes the new token's entry into its caches (in place, donated) and
attends over all slots, as qvjax.decode does. The QV forms compute the same
attention (each is checked against `qv` or `qv_norope` to --check), so the
time differences are the cost of the formulation:

  qkv            two dots: scores over cached K, weighted sum over cached V
  qv             what qvjax does: rotate V into keys (RoPE from a table), two dots
  qv_rows        as qv, one batch row at a time (a fori_loop): a row's V
                 (G S d floats) can stay in the CPU caches between the dots
  qv_reduce      scores as a multiply-reduce with the rotation fused in, so
                 the keys are never written (XLA:CPU fuses elementwise ops into
                 reductions, not into dots)
  qv_norope      two dots over V, no rotation: the floor for reading V
                 twice, and QV's real cost under alibi/agf/sinusoidal/none
  qv_rows_norope qv_norope one row at a time

Figures and what they say: docs/performance.md ("Decoding").
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from qvjax import host, positions
from qvjax.attention.base import dot_product_attention

flags.DEFINE_integer('batch', 8, 'Sequences decoded together.')
flags.DEFINE_integer('context', 4096, 'Cached slots (all attended).')
flags.DEFINE_integer('kv_heads', 4, 'KV heads (= query heads here).')
flags.DEFINE_integer('head_dim', 64, 'Head width.')
flags.DEFINE_integer('layers', 4, 'Layers (one cache each, attended in turn).')
flags.DEFINE_integer('steps', 15, 'Timed calls per form (median reported).')
flags.DEFINE_float('check', 1e-5, 'Max abs difference allowed to the reference.')
FLAGS = flags.FLAGS


def view(cache_BGSd):
  """The (B, S, G, d) view of a heads-major cache (as qvjax.attention.base's
  logical_view: a transpose XLA folds into the dots)."""
  return cache_BGSd.transpose(0, 2, 1, 3)


def rope(v_BSGd):
  """Slot s at position s, from qvjax's host table (as decoding does)."""
  return positions.apply_rope(v_BSGd, None, 10_000.0, v_BSGd.shape[1])


def two_dots(q_BGd, k_BSGd, v_BSGd):
  """qvjax's attention op (the grouped einsums on CPU) for one query token."""
  mask_111S = jnp.ones((1, 1, 1, k_BSGd.shape[1]), jnp.bool_)
  return dot_product_attention(q_BGd[:, None], k_BSGd, v_BSGd, None, mask_111S)[:, 0]


def qkv(q_BGd, k_BGSd, v_BGSd):
  return two_dots(q_BGd, view(k_BGSd), view(v_BGSd))


def qv(q_BGd, v_BGSd, rotate=True):
  v_BSGd = view(v_BGSd)
  return two_dots(q_BGd, rope(v_BSGd) if rotate else v_BSGd, v_BSGd)


def qv_reduce(q_BGd, v_BGSd):
  v_BSGd = view(v_BGSd)
  scores_BGS = jnp.sum(q_BGd[:, None] * rope(v_BSGd), axis=-1).transpose(0, 2, 1)
  probs_BGS = jax.nn.softmax(scores_BGS * q_BGd.shape[-1] ** -0.5, axis=-1)
  return jnp.einsum('bgs,bsgd->bgd', probs_BGS, v_BSGd)


def write(q_BGd, cache_BGSd):
  """The new token's entry (here the layer input) into the last slot."""
  return jax.lax.dynamic_update_slice_in_dim(cache_BGSd, q_BGd[:, :, None],
                                             cache_BGSd.shape[2] - 1, 2)


def whole(form):
  """A decode layer: write every row's entry, then attend over the batch."""
  def layer(q_BGd, caches_BGSd):
    written = tuple(write(q_BGd, c) for c in caches_BGSd)
    return form(q_BGd, *written), written
  return layer


def by_rows(form):
  """A decode layer one batch row at a time (a fori_loop carrying the caches,
  written in place): a row's cache (G S d floats, 4 MiB here) can stay in the
  CPU's caches between the scores and the weighted sum."""
  def layer(q_BGd, caches_BGSd):
    def row(b, carry):
      caches, out_BGd = carry
      q_1Gd = jax.lax.dynamic_slice_in_dim(q_BGd, b, 1, 0)
      caches = tuple(jax.lax.dynamic_update_slice(c, q_1Gd[:, :, None], (b, 0, c.shape[2] - 1, 0))
                     for c in caches)
      rows = (jax.lax.dynamic_slice_in_dim(c, b, 1, 0) for c in caches)
      return caches, jax.lax.dynamic_update_slice_in_dim(out_BGd, form(q_1Gd, *rows), b, 0)
    caches, out_BGd = jax.lax.fori_loop(0, q_BGd.shape[0], row,
                                        (tuple(caches_BGSd), jnp.zeros_like(q_BGd)))
    return out_BGd, caches
  return layer


def norope(q_BGd, v_BGSd):
  return qv(q_BGd, v_BGSd, rotate=False)


FORMS = {  # name -> (what each layer caches, one decode layer)
    'qkv': ('k, v', whole(qkv)),
    'qv': ('v, rope', whole(qv)),
    'qv_rows': ('v, rope', by_rows(qv)),
    'qv_reduce': ('v, rope', whole(qv_reduce)),
    'qv_norope': ('v', whole(norope)),
    'qv_rows_norope': ('v', by_rows(norope)),
}


def stack(layer_fn, per_layer: int, layers: int):
  """One decode step over all layers, jitted with the caches donated (as
  qvjax.decode's step): each layer writes its input, the new token's entry,
  into its caches and attends; its output is the next layer's input. Caches
  are stored heads-major, (B, G, S, d), as qvjax.decode stores them. The write
  also orders the layers: without it XLA may rotate every layer's cache up
  front and keep all the rotated copies alive at once."""
  def step(q_BGd, caches_BGSd):
    written = ()
    for i in range(layers):
      q_BGd, mine = layer_fn(q_BGd, caches_BGSd[i * per_layer:(i + 1) * per_layer])
      written += mine
    return q_BGd, written
  return jax.jit(step, donate_argnums=1)


def run(batch, context, kv_heads, head_dim, layers, steps=15, check=1e-5, log=print):
  """{form: ms per step}; raises if a form's output differs from its reference."""
  shape = (batch, kv_heads, context, head_dim)
  keys = jax.random.split(jax.random.key(0), 2 * layers + 1)
  q = jax.random.normal(keys[0], (batch, kv_heads, head_dim))

  def caches(per_layer):  # Fresh ones for every form: the step donates them.
    return tuple(jax.random.normal(keys[1 + i], shape) for i in range(per_layer * layers))

  # The QV forms' references: qvjax's op over V's rotated keys, or over V.
  expected = {kind: stack(FORMS[form][1], 1, layers)(q, caches(1))[0]
              for kind, form in (('v, rope', 'qv'), ('v', 'qv_norope'))}
  out = {}
  for name, (cached, layer_fn) in FORMS.items():
    per_layer = 2 if cached == 'k, v' else 1
    fn, state = stack(layer_fn, per_layer, layers), caches(per_layer)
    q_out, state = fn(q, state)
    if cached in expected:
      err = float(jnp.max(jnp.abs(q_out - expected[cached])))
      if err > check:
        raise AssertionError(f'{name}: differs from the reference by {err:.2e} > {check}')
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      q_out, state = fn(q, state)
      jax.block_until_ready(q_out)
      times.append(time.perf_counter() - start)
    del state
    out[name] = 1e3 * float(np.median(times))
    log(f'{name:15s} {out[name]:8.2f} ms  {out[name] / out["qkv"]:5.2f}x qkv')
  return out


def main(argv):
  del argv
  host.keep_freed_memory()  # As qvjax.bench does (qvjax.main does not).
  mib = FLAGS.batch * FLAGS.context * FLAGS.kv_heads * FLAGS.head_dim * 4 * FLAGS.layers / 2 ** 20
  print(f'{jax.default_backend()}: batch {FLAGS.batch}, context {FLAGS.context}, '
        f'{FLAGS.kv_heads} KV heads of {FLAGS.head_dim}, {FLAGS.layers} layers '
        f'(V cache {mib:.0f} MiB, K as much), float32')
  run(FLAGS.batch, FLAGS.context, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.layers,
      FLAGS.steps, FLAGS.check)


if __name__ == '__main__':
  app.run(main)
