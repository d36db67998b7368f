"""The training loop: resume, step, report, evaluate, checkpoint, sample."""

import time

import jax
import numpy as np
from absl import logging
from flax.core import spmd

from qvjax import checkpoint, config as config_lib, data, metrics, preemption, sharding, train


class NonFiniteError(config_lib.RunStopped):
  """Training stopped on a non-finite loss or gradient (main exits 1)."""


class NonFiniteGuard:
  """Applies config.nonfinite_policy to each step's loss and gradients."""

  def __init__(self, c, names: list[str]):
    self.c, self.names = c, names
    self.consecutive = self.skipped = 0

  def check(self, step: int, loss: float, grad_norm: float, grads_finite) -> None:
    bad = None
    if not np.isfinite(loss):
      bad = f'loss={loss}'
    elif not np.isfinite(grad_norm):
      first = self.names[int(np.argmin(grads_finite))] if not grads_finite.all() else '?'
      bad = f'gradient of {first} (grad_norm={grad_norm})'
    if bad is None:
      self.consecutive = 0
      return
    self.consecutive += 1
    if self.c.nonfinite_policy == 'stop' or self.consecutive > self.c.max_consecutive_nonfinite:
      raise NonFiniteError(
          f'step {step}: {bad} is not finite (nonfinite_policy={self.c.nonfinite_policy}, '
          f'{self.consecutive} in a row); the last checkpoint before it is kept')
    self.skipped += 1
    logging.warning('step %d: %s is not finite; update skipped (%d so far)', step, bad,
                    self.skipped)


class Reporter:
  """Turns step statistics into tokens/s and MFU, for the progress bar and
  the writers. Process 0 alone shows a bar."""

  def __init__(self, c, writer, guard: NonFiniteGuard, start: int, tokens_per_step: int,
               flops_per_token: float, peak: float, show: bool):
    self.c, self.writer, self.guard, self.peak = c, writer, guard, peak
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.last_time, self.last_step = time.perf_counter(), start
    self.bar = None
    if show and start < c.num_train_steps:
      from tqdm import tqdm
      self.bar = tqdm(total=c.num_train_steps, initial=start, desc='train', dynamic_ncols=True)

  def step(self, step: int, stats) -> dict:
    """Reads one step's (already computed) statistics; logs every log_every_steps."""
    stats = jax.device_get(stats)
    grads_finite = stats.pop('grads_finite')
    stats = {k: float(v) for k, v in stats.items()}
    self.guard.check(step, stats['loss'], stats['grad_norm'], grads_finite)
    stats['skipped_updates'] = self.guard.skipped
    if step % self.c.log_every_steps and step != self.c.num_train_steps:
      return stats
    now = time.perf_counter()
    tok_s = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    stats.update(tokens_per_s=tok_s, mfu=tok_s * self.flops_per_token / self.peak)
    self.writer.scalars(step, stats)
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{stats["loss"]:.3f}', tok_s=f'{tok_s:.0f}',
                           mfu=f'{stats["mfu"]:.1%}', refresh=False)
    return stats

  def say(self, text: str):
    if self.bar is not None:
      self.bar.write(text)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def peak_flops(dtype='float32') -> tuple[float, str]:
  """(the job's peak FLOP/s, its source): published per-chip peaks on known
  GPUs/TPUs times the device count; on CPU the measured matmul rate."""
  peak, source = metrics.peak_flops_per_device(dtype)
  if jax.devices()[0].platform != 'cpu':
    peak *= jax.device_count()  # Fake CPU devices share one set of cores.
  return peak, source


def train_and_evaluate(c, workdir: str) -> dict:
  """Trains to c.num_train_steps (resuming from the workdir's latest
  checkpoint), evaluating and checkpointing on the way; prints a sample."""
  is_lead = jax.process_index() == 0
  mesh = sharding.mesh_for(c)
  batch_size = config_lib.global_batch_size(c, jax.device_count())
  local_batch = batch_size // jax.process_count()
  host = dict(process_index=jax.process_index(), process_count=jax.process_count())
  tokenizer = data.get_tokenizer(c, workdir)
  data.check_vocab(c, tokenizer)
  train_iter = data.make_train_iterator(c, tokenizer, local_batch_size=local_batch, **host)
  eval_batches = data.make_eval_batches(c, tokenizer, local_batch_size=local_batch,
                                        num_batches=c.eval_batches, **host)
  token_bytes_V = metrics.token_byte_lengths(tokenizer, c.model.vocab_size)
  writer = metrics.Writer(workdir, enabled=is_lead)
  manager = checkpoint.make_manager(workdir, c)
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(c.model, mesh)):
    setup = train.build(c, mesh)
    train_step, eval_step = train.make_train_step(setup, mesh), train.make_eval_step(setup, mesh)
    restored = checkpoint.restore_newest_intact(manager, workdir, setup.abstract,
                                                setup.shardings, train_iter, tokenizer)
    if restored is None:
      state, start = setup.init(), 0
    else:
      state, _, start = restored
      if is_lead:
        print(f'Resuming from the checkpoint at step {start} in {workdir}', flush=True)
    meta = {'model': c.model.to_dict(), 'tokenizer': data.tokenizer_fingerprint(tokenizer),
            'seq_len': c.seq_len, 'processes': jax.process_count()}
    flops_per_token = metrics.train_flops_per_token(c.model, c.seq_len)
    peak, peak_source = peak_flops(c.model.dtype)
    if is_lead:
      print(f'{c.model.attention}: {metrics.param_count(setup.abstract[0]) / 1e6:.2f}M params, '
            f'{flops_per_token / 1e6:.1f} MFLOPs/token, peak {peak / 1e9:.1f} GFLOP/s '
            f'({peak_source}), mesh {sharding.describe(mesh)}, global batch {batch_size}',
            flush=True)
    guard = NonFiniteGuard(c, train.param_names(setup))
    reporter = Reporter(c, writer, guard, start, batch_size * c.seq_len, flops_per_token, peak,
                        is_lead)
    stopper = preemption.Preemption()
    step, pending, preempted, result = start, None, False, {}
    try:
      while step < c.num_train_steps and not preempted:
        state, stats = train_step(state, train.to_global(next(train_iter), mesh))
        step += 1
        # The previous step's numbers are read only now, after this step is
        # dispatched, so the device never waits on the host.
        if pending is not None:
          result.update(reporter.step(*pending))
        pending = (step, stats)
        if reporter.bar is not None:
          reporter.bar.update(1)
        preempted = stopper.reached(step)
        evaluate_now = step % c.eval_every_steps == 0 or step == c.num_train_steps
        save_now = preempted or step % c.checkpoint_every_steps == 0 or step == c.num_train_steps
        if evaluate_now or save_now:
          # Checked before it is saved: a non-finite state never reaches disk.
          result.update(reporter.step(*pending))
          pending = None
        if evaluate_now:
          ev = train.evaluate(eval_step, state[0], eval_batches, token_bytes_V, mesh)
          writer.scalars(step, ev)
          result.update(ev)
          reporter.say(f'step {step}: train loss {result["loss"]:.4f}, eval loss '
                       f'{ev["eval_loss"]:.4f}, perplexity {ev["eval_perplexity"]:.2f}')
        if save_now:
          checkpoint.save(manager, step, state, train_iter, meta | {'step': step})
      if pending is not None:
        result.update(reporter.step(*pending))
    finally:
      stopper.close()
      reporter.close()
      train_iter.close()
      manager.wait_until_finished()
    if preempted:
      logging.warning('Stopped by signal at step %d', step)
      if is_lead:
        print(f'Stopped by signal: saved step {step}; run the same command to resume.',
              flush=True)
    else:
      if start >= c.num_train_steps and is_lead:
        print(f'Already trained to step {start} (num_train_steps={c.num_train_steps}); '
              'raise --config.num_train_steps to train further.')
      if 'eval_loss' not in result:
        result.update(train.evaluate(eval_step, state[0], eval_batches, token_bytes_V, mesh))
      if is_lead:
        print(f'Final eval loss {result["eval_loss"]:.4f}, perplexity '
              f'{result["eval_perplexity"]:.2f} at step {step}', flush=True)
      if c.sample.max_new_tokens:
        train.print_sample(c, setup, state[0], tokenizer, mesh, is_lead)
  writer.close()
  manager.close()
  return result
