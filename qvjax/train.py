"""The train state, the jitted steps, and the loop.

The state is a pair of nnx.States (model, optimizer); the jitted steps are
pure functions of it, merging into modules inside and splitting on the way
out. Shardings come once from the abstract state's logical axis names.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from flax.core import spmd

from qvjax import checkpoint, config as config_lib, data, metrics, sampling, sharding
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
  return tx, schedule


@dataclasses.dataclass
class Setup:
  """Everything static about a run's state on a mesh."""
  graphdefs: tuple  # (model, optimizer)
  abstract: tuple  # nnx.States of ShapeDtypeStructs
  shardings: tuple  # the same trees of NamedShardings
  schedule: optax.Schedule
  init: callable  # () -> state, jitted with out_shardings


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

  return Setup((gm, go), (am, ao), shardings, schedule, init)


def loss_terms(model, batch):
  """Summed next-token cross-entropy and the number of counted targets."""
  logits_BTV = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
  weights_BT = batch['weights']
  return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT)


def make_train_step(setup: Setup, mesh):
  gm, go = setup.graphdefs

  def loss_fn(model, batch):
    total, count = loss_terms(model, batch)
    return total / jnp.maximum(count, 1.0)

  @functools.partial(jax.jit, in_shardings=(setup.shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(setup.shardings, sharding.replicated(mesh)),
                     donate_argnums=0)
  def train_step(state, batch):
    model, opt = nnx.merge(gm, state[0]), nnx.merge(go, state[1])
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    step = opt.step[...]
    opt.update(model, grads)
    stats = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': setup.schedule(step)}
    return (nnx.state(model), nnx.state(opt)), stats

  return train_step


def make_eval_step(setup: Setup, mesh):
  gm = setup.graphdefs[0]

  @functools.partial(jax.jit, in_shardings=(setup.shardings[0], sharding.batch_sharding(mesh)),
                     out_shardings=sharding.replicated(mesh))
  def eval_step(model_state, batch):
    return loss_terms(nnx.merge(gm, model_state), batch)

  return eval_step


def to_global(batch: dict, mesh) -> dict:
  """This host's rows -> one global array per key, sharded over data and fsdp."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, v) for k, v in batch.items()}


def evaluate(eval_step, model_state, batches, mesh) -> dict:
  total, count = 0.0, 0.0
  for batch in batches:
    t, n = eval_step(model_state, to_global(batch, mesh))
    total, count = total + float(t), count + float(n)
  loss = total / max(count, 1.0)
  return {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 50.0))),
          'eval_tokens': count}


def train_and_evaluate(c, workdir: str):
  """Trains c.num_train_steps (resuming from the workdir's latest checkpoint),
  evaluating and checkpointing on the way; prints a sample at the end."""
  is_lead = jax.process_index() == 0
  shape = config_lib.validate(c, jax.device_count(), jax.process_count(), workdir)
  mesh = sharding.make_mesh(shape)
  rules = sharding.logical_rules(c.model, mesh)
  batch_size = config_lib.global_batch_size(c, jax.device_count())
  local_batch = batch_size // jax.process_count()
  logging.info('Mesh %s; global batch %d (%d per process)', sharding.describe(mesh),
               batch_size, local_batch)

  tokenizer = data.get_tokenizer(c, workdir)
  if tokenizer.vocab_size != c.model.vocab_size:
    raise config_lib.ConfigError(
        f'config.model.vocab_size={c.model.vocab_size} is invalid: the tokenizer at '
        f'{tokenizer.path} has {tokenizer.vocab_size} pieces; set them equal')
  train_iter = data.make_train_iterator(
      c, tokenizer, local_batch_size=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_batches = data.make_eval_batches(
      c, tokenizer, local_batch_size=local_batch, num_batches=c.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count())

  writer = metrics.Writer(workdir, enabled=is_lead)
  manager = checkpoint.make_manager(workdir, c)
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    setup = build(c, mesh)
    train_step, eval_step = make_train_step(setup, mesh), make_eval_step(setup, mesh)
    n_params = metrics.param_count(setup.abstract[0])
    start = manager.latest_step()
    if start is None:
      state, start = setup.init(), 0
    else:
      state, _ = checkpoint.restore(manager, start, setup.abstract, setup.shardings, train_iter)
      if is_lead:
        print(f'Resuming from the checkpoint at step {start} in {workdir}', flush=True)
    meta = {'model': c.model.to_dict(), 'tokenizer': tokenizer.path,
            'vocab_size': tokenizer.vocab_size, 'seq_len': c.seq_len}

    flops_per_token = metrics.train_flops_per_token(c.model, c.seq_len)
    peak = metrics.measure_peak_flops()
    if jax.devices()[0].platform != 'cpu':
      peak *= jax.device_count()  # Fake CPU devices share one set of cores.
    if is_lead:
      print(f'{c.model.attention}: {n_params / 1e6:.2f}M params, '
            f'{flops_per_token / 1e6:.1f} MFLOPs/token, peak {peak / 1e9:.1f} GFLOP/s '
            f'(measured matmul), mesh {sharding.describe(mesh)}', flush=True)

    progress = None
    if is_lead and start < c.num_train_steps:
      from tqdm import tqdm
      progress = tqdm(total=c.num_train_steps, initial=start, desc='train',
                      dynamic_ncols=True)
    tokens_per_step = batch_size * c.seq_len
    pending = None
    last_time, last_step = time.perf_counter(), start
    step = start
    result = {}

    def report(done_step, stats):
      nonlocal last_time, last_step
      stats = {k: float(v) for k, v in jax.device_get(stats).items()}
      if done_step % c.log_every_steps and done_step != c.num_train_steps:
        return stats
      now = time.perf_counter()
      tok_s = (done_step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
      last_time, last_step = now, done_step
      stats.update(tokens_per_s=tok_s, mfu=tok_s * flops_per_token / peak)
      writer.scalars(done_step, stats)
      if progress is not None:
        progress.set_postfix(loss=f'{stats["loss"]:.3f}', tok_s=f'{tok_s:.0f}',
                             mfu=f'{stats["mfu"]:.1%}', refresh=False)
      return stats

    while step < c.num_train_steps:
      batch = to_global(next(train_iter), mesh)
      state, stats = train_step(state, batch)
      step += 1
      # The previous step's numbers are read only now, after this step is
      # dispatched, so the device never waits on the host.
      if pending is not None:
        result.update(report(*pending))
      pending = (step, stats)
      if progress is not None:
        progress.update(1)
      if step % c.eval_every_steps == 0 or step == c.num_train_steps:
        result.update(report(*pending))
        pending = None
        ev = evaluate(eval_step, state[0], eval_batches, mesh)
        writer.scalars(step, ev)
        result.update(ev)
        if progress is not None:
          progress.write(f'step {step}: train loss {result["loss"]:.4f}, eval loss '
                         f'{ev["eval_loss"]:.4f}, perplexity {ev["eval_perplexity"]:.2f}')
      if step % c.checkpoint_every_steps == 0 or step == c.num_train_steps:
        checkpoint.save(manager, step, state, train_iter, meta | {'step': step})
    if pending is not None:
      result.update(report(*pending))
    if progress is not None:
      progress.close()
    manager.wait_until_finished()
    if start >= c.num_train_steps and is_lead:
      print(f'Already trained to step {start} (num_train_steps={c.num_train_steps}); '
            'raise --config.num_train_steps to train further.')
    if not result:
      result.update(evaluate(eval_step, state[0], eval_batches, mesh))
    if is_lead:
      print(f'Final eval loss {result["eval_loss"]:.4f}, perplexity '
            f'{result["eval_perplexity"]:.2f} at step {step}', flush=True)
    if c.sample.max_new_tokens:
      print_sample(c, setup, state[0], tokenizer, mesh, is_lead)
  writer.close()
  manager.close()
  return result


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
