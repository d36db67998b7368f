"""The train state, the jitted steps, evaluation and sampling (the loop that
drives them is qvjax.loop).

The state is a pair of nnx.States (model, optimizer); the jitted steps are
pure functions of it, merging into modules inside and splitting on the way
out. Shardings come once from the abstract state's logical axis names.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import spmd

from qvjax import sampling, sharding
from qvjax.layers import constrain
from qvjax.model import Decoder


def make_optimizer(c) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=max(c.num_train_steps, c.warmup_steps + 1),
      end_value=c.learning_rate * c.end_learning_rate_ratio)
  # Norm scales (1-D) get no weight decay; matrices and embeddings do.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip_norm),
      optax.adamw(schedule, b1=c.adam_b1, b2=c.adam_b2, weight_decay=c.weight_decay,
                  mask=decay_mask))
  if c.nonfinite_policy == 'skip':
    # Leaves params and moments untouched on a non-finite step.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=c.max_consecutive_nonfinite)
  return tx, schedule


EXECUTION_DEFAULTS = {'remat': 'none', 'loss_chunk': 0, 'grad_accum_steps': 1}


@dataclasses.dataclass
class Setup:
  """Everything static about a run's state on a mesh."""
  graphdefs: tuple  # (model, optimizer)
  abstract: tuple  # nnx.States of ShapeDtypeStructs
  shardings: tuple  # the same trees of NamedShardings
  schedule: optax.Schedule
  init: callable  # () -> state, jitted with out_shardings
  # Execution knobs: remat, loss_chunk, grad_accum_steps (configs/default.py).
  execution: dict = dataclasses.field(default_factory=dict)


def build(c, mesh) -> Setup:
  """Abstract state, its shardings and a jitted init. Call under the mesh and rules."""
  tx, schedule = make_optimizer(c)

  def init_modules():
    model = Decoder(c.model, nnx.Rngs(c.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  abstract_model, abstract_opt = nnx.eval_shape(init_modules)
  (gm, am), (go, ao) = nnx.split(abstract_model), nnx.split(abstract_opt)
  shardings = (sharding.state_shardings(am, mesh), sharding.state_shardings(ao, mesh))

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    model, opt = init_modules()
    return nnx.state(model), nnx.state(opt)

  execution = {k: c.get(k, v) for k, v in EXECUTION_DEFAULTS.items()}
  return Setup((gm, go), (am, ao), shardings, schedule, init, execution)


def loss_terms(model, batch, remat: str = 'none', loss_chunk: int = 0):
  """Summed next-token cross-entropy and the number of counted targets.

  loss_chunk > 0 (config.loss_chunk) computes logits and loss for that many
  positions of every row at a time, recomputing each chunk's logits in the
  backward pass: the (B, T, V) logits are never all stored. Same result.
  """
  x_BTD = model.features(batch['inputs'], batch['positions'], batch['segment_ids'], remat)
  weights_BT = batch['weights']
  T = x_BTD.shape[1]
  if not loss_chunk or loss_chunk >= T:
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(model.logits(x_BTD),
                                                                batch['targets'])
    return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT)

  # The head is built once, outside the loop: a tied head is a transposed copy
  # of the embedding, which each chunk would otherwise rebuild (and hold).
  head_DV = model.head().astype(x_BTD.dtype)

  def chunk_loss(total, chunk):
    x_BcD, targets_Bc, weights_Bc = chunk
    losses_Bc = optax.softmax_cross_entropy_with_integer_labels(model.logits(x_BcD, head_DV),
                                                                targets_Bc)
    return total + jnp.sum(losses_Bc * weights_Bc), None

  # Chunks along the sequence, so the (data, fsdp)-sharded batch axis stays whole.
  split = lambda a: jnp.moveaxis(a.reshape(a.shape[:1] + (T // loss_chunk, loss_chunk)
                                           + a.shape[2:]), 1, 0)
  total, _ = jax.lax.scan(jax.checkpoint(chunk_loss), jnp.zeros((), jnp.float32),
                          (split(x_BTD), split(batch['targets']), split(weights_BT)))
  return total, jnp.sum(weights_BT)


def microbatches(batch: dict, steps: int) -> dict:
  """(B, ...) -> (steps, B / steps, ...): microbatch i takes rows i, i + steps, ...
  so every device keeps its own rows (the batch axis is sharded in blocks)."""
  def split(a):
    a = a.reshape((a.shape[0] // steps, steps) + a.shape[1:])
    return constrain(jnp.moveaxis(a, 1, 0), (None, 'batch') + (None,) * (a.ndim - 2))
  return jax.tree.map(split, batch)


def loss_and_grads(model, batch, execution: dict):
  """Mean loss over the batch's counted targets and its gradient w.r.t. the
  parameters. With grad_accum_steps = k > 1 the batch runs as k sequential
  microbatches whose gradients are summed (each scaled by the whole batch's
  target count), so the result is the full batch's, at 1/k of the activations."""
  x = EXECUTION_DEFAULTS | execution
  remat, chunk, k = x['remat'], x['loss_chunk'], x['grad_accum_steps']

  def loss_fn(model, batch, count):
    total, _ = loss_terms(model, batch, remat, chunk)
    return total / count

  count = jnp.maximum(jnp.sum(batch['weights']), 1.0)
  if k == 1:
    return nnx.value_and_grad(loss_fn)(model, batch, count)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def accumulate(carry, micro):
    loss, grads = carry
    micro_loss, micro_grads = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest), micro, count))(params)
    return (loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                  microbatches(batch, k))
  return loss, grads


def make_train_step(setup: Setup, mesh):
  """The jitted (state, batch) -> (state, stats), run as setup.execution says."""
  gm, go = setup.graphdefs

  @functools.partial(jax.jit, in_shardings=(setup.shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(setup.shardings, sharding.replicated(mesh)),
                     donate_argnums=0)
  def train_step(state, batch):
    model, opt = nnx.merge(gm, state[0]), nnx.merge(go, state[1])
    loss, grads = loss_and_grads(model, batch, setup.execution)
    step = opt.step[...]
    opt.update(model, grads)
    finite_leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(nnx.to_pure_dict(grads))]
    stats = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': setup.schedule(step), 'grads_finite': jnp.stack(finite_leaves)}
    return (nnx.state(model), nnx.state(opt)), stats

  return train_step


def param_names(setup: Setup) -> list[str]:
  """Dotted names of the parameters, in the order of `stats['grads_finite']`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(setup.abstract[0]))
  return ['.'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]


def make_eval_step(setup: Setup, mesh):
  """(model state, batch, bytes per token id) -> summed loss, targets, bytes."""
  gm = setup.graphdefs[0]

  @functools.partial(jax.jit, in_shardings=(setup.shardings[0], sharding.batch_sharding(mesh),
                                            sharding.replicated(mesh)),
                     out_shardings=sharding.replicated(mesh))
  def eval_step(model_state, batch, token_bytes_V):
    total, count = loss_terms(nnx.merge(gm, model_state), batch,
                              loss_chunk=setup.execution.get('loss_chunk', 0))
    return total, count, jnp.sum(token_bytes_V[batch['targets']] * batch['weights'])

  return eval_step


def to_global(batch: dict, mesh) -> dict:
  """This host's rows -> one global array per key, sharded over data and fsdp."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, v) for k, v in batch.items()}


def evaluate(eval_step, model_state, batches, token_bytes_V, mesh) -> dict:
  """Loss, perplexity and bits per byte (of UTF-8 text) over the batches."""
  total = count = n_bytes = 0.0
  for batch in batches:
    t, n, b = eval_step(model_state, to_global(batch, mesh), token_bytes_V)
    total, count, n_bytes = total + float(t), count + float(n), n_bytes + float(b)
  loss = total / max(count, 1.0)
  return {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 50.0))),
          'eval_bits_per_byte': total / np.log(2) / max(n_bytes, 1.0), 'eval_tokens': count}


def print_sample(c, setup, model_state, tokenizer, mesh, is_lead):
  # A batch of one cannot be split over the data axes: replicate it.
  rules = [(k, None if k == 'batch' else v) for k, v in sharding.logical_rules(c.model, mesh)]
  stream = (lambda piece: print(piece, end='', flush=True)) if is_lead else None
  if is_lead:
    print('--- sample ---\n' + c.sample.prompt, end='', flush=True)
  with spmd.logical_axis_rules(rules):
    sampling.generate(setup.graphdefs[0], model_state, tokenizer, c.sample.prompt,
                      seq_len=c.seq_len, max_new_tokens=c.sample.max_new_tokens,
                      temperature=c.sample.temperature, top_k=c.sample.top_k,
                      seed=c.seed, on_text=stream)
  if is_lead:
    print('\n--------------', flush=True)
