"""Orbax checkpoints: one directory per step under <workdir>/checkpoints with
four items: `params` and `opt_state` (plain nested dicts of arrays, so the
format does not depend on Python class names), `data` (the grain iterator's
position) and `meta` (step, model config, tokenizer).

Restores target an abstract tree whose leaves carry the *current* mesh's
shardings, so a checkpoint loads onto whatever topology the run has now.
"""

import os
import shutil
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx

from qvjax import data
from qvjax.config import ConfigError

ITEMS = ('params', 'opt_state', 'data', 'meta')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, config, read_only: bool = False) -> ocp.CheckpointManager:
  if read_only:  # What Orbax would set itself for a reader, minus its warnings.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           max_to_keep=None)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep,
                                           enable_async_checkpointing=True)
  handlers = {'params': ocp.StandardCheckpointHandler(),
              'opt_state': ocp.StandardCheckpointHandler(),
              'data': grain.checkpoint.CheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def check_shapes(manager, step: int, model_abstract):
  """Raises ConfigError naming the first parameter whose stored shape (or
  presence) differs from the configured model's."""
  stored = manager.item_metadata(step)['params']
  want = dict(_flat_shapes(nnx.to_pure_dict(model_abstract)))
  have = dict(_flat_shapes(stored))
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      raise ConfigError(
          f'checkpoint step {step} in {manager.directory} does not fit '
          f'the configured model: parameter {name} is {have.get(name, "absent")} there and '
          f'{want.get(name, "absent")} in this config')


def _flat_shapes(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in flat:
    yield '.'.join(str(getattr(k, 'key', k)) for k in path), tuple(leaf.shape)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save(manager, step: int, state, data_iter, meta: dict) -> None:
  """Starts an async save of (model, optimizer) state and the data position."""
  model_state, opt_state = state
  manager.save(step, force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
      opt_state=ocp.args.StandardSave(nnx.to_pure_dict(opt_state)),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
  ))


def restore(manager, step: int, abstract_state, shardings, data_iter):
  """Restores everything into `abstract_state`'s structure; returns
  (state, meta). `data_iter` is advanced in place."""
  model_abs, opt_abs = abstract_state
  model_sh, opt_sh = shardings
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_abs),
                                                nnx.to_pure_dict(model_sh))),
      opt_state=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_abs),
                                                   nnx.to_pure_dict(opt_sh))),
      data=grain.checkpoint.CheckpointRestore(data_iter),
      meta=ocp.args.JsonRestore(),
  ))
  nnx.replace_by_pure_dict(model_abs, restored.params)
  nnx.replace_by_pure_dict(opt_abs, restored.opt_state)
  return (model_abs, opt_abs), restored.meta


def quarantine(workdir: str, step: int) -> str:
  """Moves a damaged step out of the manager's way (never deletes it)."""
  src = os.path.join(checkpoint_dir(workdir), str(step))
  dest = os.path.join(os.path.abspath(workdir), 'damaged_checkpoints', str(step))
  if jax.process_index() == 0 and os.path.exists(src):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.exists(dest):
      dest = f'{dest}.{int(time.time())}'
    shutil.move(src, dest)
  multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
  return dest


def check_compatible(manager, step: int, model_abstract, tokenizer):
  """ConfigError if the step was written for another model shape, tokenizer
  or process count: the user must choose, nothing is damaged."""
  check_shapes(manager, step, model_abstract)
  meta = restore_meta(manager, step)
  data.check_tokenizer(meta['tokenizer'], tokenizer)
  written_by = meta.get('processes', 1)
  if written_by != jax.process_count():
    raise ConfigError(
        f'checkpoint step {step} was written by {written_by} processes and its data '
        f'position is per process: resume it with {written_by} processes (--mode=eval '
        f'restores params onto any topology)')


def restore_newest_intact(manager, workdir, abstract_state, shardings, data_iter, tokenizer):
  """(state, meta, step) from the newest step that restores completely, or
  None. Damaged steps (killed mid-save, truncated or missing files) are moved
  to <workdir>/damaged_checkpoints with a warning naming them."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      check_compatible(manager, step, abstract_state[0], tokenizer)
    except ConfigError:
      raise
    except Exception:  # Unreadable metadata: damaged; restore below says how.
      pass
    try:
      state, meta = restore(manager, step, abstract_state, shardings, data_iter)
      return state, meta, step
    except Exception as e:  # Whatever the storage layer raises for bad bytes.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      dest = quarantine(workdir, step)
      message = f'Checkpoint step {step} is damaged ({reason}); moved it to {dest}'
      logging.warning(message)
      if jax.process_index() == 0:
        print(f'warning: {message}; trying an older one', flush=True)
      manager.reload()
  return None


def restore_meta(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_params(manager, step: int, model_abstract, model_shardings):
  """Params only (no optimiser state): what evaluation and generation need."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_abstract),
                                                nnx.to_pure_dict(model_shardings))),
      meta=ocp.args.JsonRestore(),
  ))
  nnx.replace_by_pure_dict(model_abstract, restored.params)
  return model_abstract, restored.meta
