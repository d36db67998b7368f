"""Validation of a run's ConfigDict: every bad knob fails here, in one line,
before anything is compiled or written.

This module imports no JAX: `validate_static` runs in a fraction of a second,
before JAX starts; `validate_for_devices` needs the device count.
"""

import os

import ml_collections
import numpy as np

# The names the registries in qvjax.attention and qvjax.positions implement
# (qvjax.attention asserts it on import).
PARADIGMS = ('qkv', 'qv', 'qv_ka', 'mla', 'mla_qv')
MLA_PARADIGMS = ('mla', 'mla_qv')
POSITIONS = ('rope', 'alibi', 'agf', 'sinusoidal', 'none')
DTYPES = ('float32', 'bfloat16')
REMAT = ('none', 'dots', 'full')  # qvjax.model.REMAT_POLICIES, plus 'none'.
MESH_AXES = ('data', 'fsdp', 'tensor')


class ConfigError(ValueError):
  """A bad configuration value; main prints it as one line and exits 2."""


class RunStopped(RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss); main prints one line, exits 1."""


def _require(ok: bool, key: str, value, valid: str):
  if not ok:
    raise ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def _positive_ints(c, keys):
  for key in keys:
    _require(isinstance(c[key], int) and c[key] > 0, key, c[key], 'must be a positive integer')


def validate_model(m: ml_collections.ConfigDict):
  """Checks the model section alone (also used when loading checkpoints)."""
  valid = ', '.join(PARADIGMS)
  _require(m.attention in PARADIGMS, 'model.attention', m.attention, f'one of {valid}')
  for key in ('num_layers', 'emb_dim', 'num_heads', 'num_kv_heads', 'head_dim',
              'mlp_dim', 'vocab_size'):
    _require(isinstance(m[key], int) and m[key] > 0, f'model.{key}', m[key],
             'must be a positive integer')
  _require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads', m.num_kv_heads,
           f'must divide model.num_heads={m.num_heads} (1 = MQA, {m.num_heads} = MHA)')
  _require(m.position in POSITIONS, 'model.position', m.position, f'one of {", ".join(POSITIONS)}')
  _require(m.position != 'rope' or m.head_dim % 2 == 0 or m.attention in MLA_PARADIGMS,
           'model.head_dim', m.head_dim, 'must be even with rope positions')
  _require(m.rope_theta > 0, 'model.rope_theta', m.rope_theta, 'must be > 0')
  _require(m.dtype in DTYPES, 'model.dtype', m.dtype, f'one of {", ".join(DTYPES)}')
  _require(m.init_std > 0, 'model.init_std', m.init_std, 'must be > 0')
  _require(0 < m.norm_eps < 1, 'model.norm_eps', m.norm_eps, 'must be in (0, 1)')
  ctx = m.qv_ka.ctx_dim
  _require(isinstance(ctx, int) and ctx >= 0, 'model.qv_ka.ctx_dim', ctx,
           'must be an integer >= 0')
  if m.position == 'agf':
    _require(m.agf.init_max >= m.agf.init_min > 0, 'model.agf',
             (m.agf.init_min, m.agf.init_max), 'needs init_max >= init_min > 0')
  if m.attention in MLA_PARADIGMS:
    _validate_mla(m)


def _validate_mla(m):
  mla = m.mla
  for key in ('kv_lora_rank', 'qk_nope_head_dim', 'v_head_dim'):
    _require(isinstance(mla[key], int) and mla[key] > 0, f'model.mla.{key}', mla[key],
             'must be a positive integer')
  for key in ('q_lora_rank', 'qk_rope_head_dim'):
    _require(isinstance(mla[key], int) and mla[key] >= 0, f'model.mla.{key}', mla[key],
             'must be an integer >= 0 (q_lora_rank 0 = plain W_Q)')
  rope = mla.qk_rope_head_dim
  _require(m.position != 'rope' or (rope > 0 and rope % 2 == 0), 'model.mla.qk_rope_head_dim',
           rope, 'must be even and > 0 with rope positions (the decoupled rope key)')
  if m.attention == 'mla_qv':
    _require(mla.qk_nope_head_dim == mla.v_head_dim, 'model.mla.qk_nope_head_dim',
             mla.qk_nope_head_dim,
             f'must equal model.mla.v_head_dim={mla.v_head_dim} for mla_qv '
             '(its content key is the value c W_UV)')


def _resolve(sizes: dict, num_devices: int, key: str) -> tuple[int, ...]:
  for axis, size in sizes.items():
    _require(isinstance(size, int) and (size > 0 or size == -1), f'{key}.{axis}', size,
             'must be a positive integer or -1')
  values = list(sizes.values())
  _require(values.count(-1) <= 1, key, sizes, 'at most one axis may be -1')
  known = int(np.prod([s for s in values if s > 0]))
  if -1 in values:
    _require(num_devices % known == 0, key, sizes,
             f'fixed axes ({known}) must divide the {num_devices} devices')
    values[values.index(-1)] = num_devices // known
  _require(int(np.prod(values)) == num_devices, key, dict(zip(sizes, values)),
           f'axis sizes must multiply to the {num_devices} devices')
  return tuple(values)


def slices(c) -> int:
  return int(np.prod([c.dcn_mesh[a] for a in MESH_AXES]))


def mesh_shapes(c, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(within-slice, across-slice) axis sizes; the mesh is their product."""
  dcn = {a: c.dcn_mesh[a] for a in MESH_AXES}
  for axis, size in dcn.items():
    _require(isinstance(size, int) and size > 0, f'dcn_mesh.{axis}', size,
             'must be a positive integer')
  n = slices(c)
  _require(num_devices % n == 0, 'dcn_mesh', dcn,
           f'{n} slices must divide the {num_devices} devices')
  ici = _resolve({a: c.mesh[a] for a in MESH_AXES}, num_devices // n, 'mesh')
  return ici, tuple(dcn.values())


def mesh_shape(c, num_devices: int) -> tuple[int, ...]:
  """The resolved mesh axis sizes (data, fsdp, tensor) over all devices."""
  ici, dcn = mesh_shapes(c, num_devices)
  return tuple(i * d for i, d in zip(ici, dcn))


def global_batch_size(c, num_devices: int) -> int:
  if c.per_device_batch_size > 0:
    return c.per_device_batch_size * num_devices
  return c.global_batch_size


def validate_static(c: ml_collections.ConfigDict, workdir: str | None = None):
  """Every check that needs no devices; raises ConfigError on the first bad knob."""
  _require(isinstance(c.name, str) and c.name.strip() and '/' not in c.name, 'name', c.name,
           'must be a non-empty name without "/" (it names runs/<name>)')
  _require(isinstance(c.seed, int) and 0 <= c.seed < 2 ** 32, 'seed', c.seed,
           'must be an integer in [0, 2**32)')
  validate_model(c.model)
  _positive_ints(c, ('seq_len', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
                     'eval_batches', 'checkpoint_every_steps', 'max_checkpoints_to_keep'))
  _require(isinstance(c.warmup_steps, int) and c.warmup_steps >= 0, 'warmup_steps',
           c.warmup_steps, 'must be an integer >= 0')
  _require((c.global_batch_size > 0) != (c.per_device_batch_size > 0), 'global_batch_size',
           (c.global_batch_size, c.per_device_batch_size),
           'set exactly one of global_batch_size and per_device_batch_size > 0, the other -1')
  for key in ('learning_rate', 'grad_clip_norm'):
    _require(c[key] > 0, key, c[key], 'must be > 0')
  _require(0 <= c.end_learning_rate_ratio <= 1, 'end_learning_rate_ratio',
           c.end_learning_rate_ratio, 'must be in [0, 1]')
  _require(c.weight_decay >= 0, 'weight_decay', c.weight_decay, 'must be >= 0')
  _require(c.nonfinite_policy in ('stop', 'skip'), 'nonfinite_policy', c.nonfinite_policy,
           'one of stop, skip')
  _require(isinstance(c.max_consecutive_nonfinite, int) and c.max_consecutive_nonfinite > 0,
           'max_consecutive_nonfinite', c.max_consecutive_nonfinite, 'must be a positive integer')
  for key in ('adam_b1', 'adam_b2'):
    _require(0 <= c[key] < 1, key, c[key], 'must be in [0, 1)')
  validate_execution(c)
  from qvjax.data import options as data_options  # It imports ConfigError from here.
  data_options.validate_config(c)
  pieces = c.tokenizer.vocab_size or c.model.vocab_size
  _require(c.tokenizer.path or pieces >= 400, 'tokenizer.vocab_size', pieces,
           'must be >= 400 to train a tokenizer (256 byte pieces + the characters)')
  _require(isinstance(c.sample.prompt, str), 'sample.prompt', c.sample.prompt, 'must be text')
  _require(c.sample.temperature >= 0, 'sample.temperature', c.sample.temperature, 'must be >= 0')
  _require(c.sample.top_k >= 0, 'sample.top_k', c.sample.top_k, 'must be >= 0')
  _require(c.sample.max_new_tokens >= 0, 'sample.max_new_tokens', c.sample.max_new_tokens,
           'must be >= 0')

  if workdir:
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
      raise ConfigError(f'--workdir={workdir} is invalid: {parent} is not a writable directory')


def validate_execution(c: ml_collections.ConfigDict):
  """The speed/memory knobs: remat, loss_chunk, grad_accum_steps."""
  _require(c.remat in REMAT, 'remat', c.remat, f'one of {", ".join(REMAT)}')
  chunk = c.loss_chunk
  _require(isinstance(chunk, int) and chunk >= 0 and (chunk == 0 or c.seq_len % chunk == 0),
           'loss_chunk', chunk, f'must be 0 (off) or a divisor of seq_len={c.seq_len}')
  _require(isinstance(c.grad_accum_steps, int) and c.grad_accum_steps > 0, 'grad_accum_steps',
           c.grad_accum_steps, 'must be a positive integer (1 = no accumulation)')


def validate_for_devices(c: ml_collections.ConfigDict, num_devices: int,
                         num_processes: int = 1) -> tuple[int, ...]:
  """The checks that depend on the devices; returns the resolved mesh shape."""
  m = c.model
  shape = mesh_shape(c, num_devices)
  n = slices(c)
  _require(n == 1 or num_processes % n == 0, 'dcn_mesh', c.dcn_mesh.to_dict(),
           f'{n} slices must divide the {num_processes} processes (each slice whole processes)')
  data, fsdp, tensor = shape
  batch = global_batch_size(c, num_devices)
  _require(batch % (data * fsdp) == 0, 'global_batch_size', batch,
           f'must be divisible by mesh data*fsdp = {data * fsdp}')
  k = c.grad_accum_steps
  _require(batch % (data * fsdp * k) == 0, 'grad_accum_steps', k,
           f'must divide the global batch per data*fsdp shard ({batch} / {data * fsdp})')
  _require(batch % num_processes == 0, 'global_batch_size', batch,
           f'must be divisible by the {num_processes} processes')
  for key in ('num_heads', 'mlp_dim', 'vocab_size'):
    _require(m[key] % tensor == 0, f'model.{key}', m[key],
             f'must be divisible by mesh.tensor={tensor}')
  _require(m.emb_dim % fsdp == 0, 'model.emb_dim', m.emb_dim,
           f'must be divisible by mesh.fsdp={fsdp}')
  return shape


def validate(c: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1,
             workdir: str | None = None) -> tuple[int, ...]:
  """All checks; raises ConfigError on the first bad knob; returns the mesh shape."""
  validate_static(c, workdir)
  return validate_for_devices(c, num_devices, num_processes)
