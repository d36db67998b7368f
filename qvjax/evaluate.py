"""`--mode=eval`: a checkpoint's params, restored onto whatever mesh this run
has (other device count, mesh shape or number of processes), scored on the
eval split. Writes <workdir>/eval_<step>.json."""

import json
import os

import jax
from flax.core import spmd

from qvjax import checkpoint, config as config_lib, data, metrics, sharding, train
from qvjax.workdir import first_difference


def pick_step(manager, workdir: str, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise config_lib.ConfigError(f'--workdir={workdir} is invalid for --mode=eval: no '
                                 f'checkpoint in {checkpoint.checkpoint_dir(workdir)}')
  if step is None:
    return max(steps)
  if step not in steps:
    raise config_lib.ConfigError(f'--step={step} is invalid: checkpoints exist for steps '
                                 f'{sorted(steps)}')
  return step


def check_model(manager, step: int, c):
  """The checkpoint must be of the configured model shape: say where not."""
  meta = checkpoint.restore_meta(manager, step)
  diff = first_difference(meta['model'], c.model.to_dict())
  if diff:
    key, was, now = diff
    raise config_lib.ConfigError(
        f'config.model.{key}={now!r} is invalid: the checkpoint at step {step} has '
        f'model.{key}={was!r}')


def run(c, workdir: str, step: int | None = None) -> dict:
  manager = checkpoint.make_manager(workdir, c, read_only=True)
  step = pick_step(manager, workdir, step)
  check_model(manager, step, c)
  if not c.tokenizer.path and not os.path.exists(os.path.join(workdir, 'tokenizer')):
    raise config_lib.ConfigError(f'--workdir={workdir} is invalid: it has no tokenizer/ '
                                 '(set --config.tokenizer.path to the one the model used)')
  tokenizer = data.get_tokenizer(c, workdir)
  mesh = sharding.mesh_for(c)
  batch_size = config_lib.global_batch_size(c, jax.device_count())
  batches = data.make_eval_batches(
      c, tokenizer, local_batch_size=batch_size // jax.process_count(),
      num_batches=c.eval_batches, process_index=jax.process_index(),
      process_count=jax.process_count())
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(c.model, mesh)):
    setup = train.build(c, mesh)
    checkpoint.check_shapes(manager, step, setup.abstract[0])
    model_state, meta = checkpoint.restore_params(manager, step, setup.abstract[0],
                                                  setup.shardings[0])
    data.check_tokenizer(meta['tokenizer'], tokenizer)
    result = train.evaluate(train.make_eval_step(setup, mesh), model_state, batches,
                            metrics.token_byte_lengths(tokenizer, c.model.vocab_size), mesh)
  manager.close()
  result.update(step=step, mesh=dict(mesh.shape), processes=jax.process_count())
  if jax.process_index() == 0:
    path = os.path.join(workdir, f'eval_{step}.json')
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'step {step}: eval loss {result["eval_loss"]:.4f}, perplexity '
          f'{result["eval_perplexity"]:.2f}, bits/byte {result["eval_bits_per_byte"]:.4f} '
          f'({result["eval_tokens"]:.0f} tokens, mesh {sharding.describe(mesh)}) -> {path}')
  return result
