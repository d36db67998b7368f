"""`--mode=generate`: the latest checkpoint's params, a KV cache, streamed text.

Loads params only (no optimiser state) onto the config's mesh, with the
batch axis replicated (one prompt), reports the cache's size per token and
streams the continuation to stdout (process 0).
"""

import os

import jax
from flax import nnx
from flax.core import spmd

from qvjax import checkpoint, config as config_lib, data, decode, sampling, sharding
from qvjax.model import Decoder
from qvjax.workdir import first_difference


def load_model(c, workdir: str, mesh):
  """(graphdef, params state, step) of the workdir's latest checkpoint. Call
  under the mesh and logical rules."""
  manager = checkpoint.make_manager(workdir, c, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise config_lib.ConfigError(f'--workdir={workdir} is invalid for --mode=generate: no '
                                 f'checkpoint in {checkpoint.checkpoint_dir(workdir)}')
  diff = first_difference(checkpoint.restore_meta(manager, step)['model'], c.model.to_dict())
  if diff:
    key, was, now = diff
    raise config_lib.ConfigError(f'config.model.{key}={now!r} is invalid: the checkpoint at '
                                 f'step {step} has model.{key}={was!r}')
  abstract = nnx.eval_shape(lambda: Decoder(c.model, nnx.Rngs(c.seed)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abstract_state, mesh)
  state, _ = checkpoint.restore_params(manager, step, abstract_state, shardings)
  manager.close()
  return graphdef, state, step


def run(config, workdir: str, *, prompt: str, max_new_tokens: int, temperature: float,
        top_k: int, seed: int) -> str:
  """Prints the cache size and streams prompt + continuation; returns that text."""
  c = config
  config_lib.validate_model(c.model)
  if not c.tokenizer.path and not os.path.exists(os.path.join(workdir, 'tokenizer')):
    raise config_lib.ConfigError(f'--workdir={workdir} is invalid: it has no tokenizer/ '
                                 '(set --config.tokenizer.path to the one the model used)')
  is_lead = jax.process_index() == 0
  mesh = sharding.mesh_for(c)
  # One prompt cannot be split over the data axes: replicate the batch.
  rules = [(k, None if k == 'batch' else v) for k, v in sharding.logical_rules(c.model, mesh)]
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    graphdef, state, step = load_model(c, workdir, mesh)
    tokenizer = data.get_tokenizer(c, workdir)
    per_token = decode.cache_bytes_per_token(c.model)
    if is_lead:
      print(f'{c.model.attention} checkpoint at step {step}: KV cache {per_token} bytes/token '
            f'({per_token // c.model.num_layers} per layer, {c.model.dtype}), '
            f'{per_token * c.seq_len / 1024:.1f} KiB for the {c.seq_len}-token window',
            flush=True)
      print(prompt, end='', flush=True)
    stream = (lambda piece: print(piece, end='', flush=True)) if is_lead else None
    text = sampling.generate(graphdef, state, tokenizer, prompt, seq_len=c.seq_len,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed, on_text=stream)
  if is_lead:
    print(flush=True)
  return text
