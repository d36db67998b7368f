"""Orbax checkpoints: one directory per step under <workdir>/checkpoints with
four items: `params` and `opt_state` (plain nested dicts of arrays, so the
format does not depend on Python class names), `data` (the grain iterator's
position) and `meta` (step, model config, tokenizer).

Restores target an abstract tree whose leaves carry the *current* mesh's
shardings, so a checkpoint loads onto whatever topology the run has now.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

ITEMS = ('params', 'opt_state', 'data', 'meta')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, config, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep,
      enable_async_checkpointing=True,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


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
