"""Memory and step time on paper: `python -m qvjax.bench --estimate --config=...`.

Per device, for a config on a mesh of `num_devices` (nothing is compiled or
allocated; the mesh is abstract):
  params      float32 master weights, each leaf's shard (its real sharding)
  grads       float32, the same shards (live during the update)
  optimizer   AdamW's two float32 moments, the same shards
  activations what the backward pass keeps, by remat policy (formula below)
  kv cache    bytes per 1k tokens of context, per sequence (model dtype)
  step time   training FLOPs per step / (devices x peak x stated MFU)

Activations per token and layer (s = bytes of model.dtype; D, H, G, d, F as
in docs/attention.md; t = mesh.tensor; T = seq_len), from what XLA keeps for
the backward pass of qvjax's block:
  none  s (5 D + attention tensors + 3 F / t) + 8 H T / t   (softmax in/out, float32;
        4 H / t instead with cuDNN flash attention: bfloat16 on a GPU chip, no bias)
  dots  s (3 D + projection outputs + 2 F / t)               (matmul outputs)
  full  s D                                                  (block inputs)
plus, with remat, one block's 'none' set (recomputed during its backward),
and the logits: 3 x 4 bytes x tokens x V / t, or x loss_chunk / T of that
with loss_chunk. Tokens per device = global batch x T / (data x fsdp x
grad_accum_steps). `tests/test_bench.py` checks the total against XLA's
memory_analysis() of the compiled step for the ~125M preset on 8 fake
devices; docs/performance.md states the tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd
from jax.sharding import AbstractMesh, AxisType

from qvjax import config as config_lib
from qvjax import decode, metrics, sharding, train


def _sharded_bytes(abstract_tree, shardings_tree) -> int:
  total = 0
  for leaf, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)):
    shape = sh.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _attention_tensors(m, t: int) -> tuple[float, float]:
  """(numbers kept per token and layer with no remat, of them matmul outputs),
  head-sharded widths divided by the tensor axis t."""
  H, G, d = m.num_heads / t, m.num_kv_heads / min(t, m.num_kv_heads), m.head_dim
  if m.attention in config_lib.MLA_PARADIGMS:
    x = m.mla
    n, p, e, r = x.qk_nope_head_dim, x.qk_rope_head_dim, x.v_head_dim, x.kv_lora_rank
    q = H * (n + p)
    keys = 0 if m.attention == 'mla_qv' else H * n
    kept = 2 * q + 2 * (r + p) + x.q_lora_rank + keys + 2 * H * e
    return kept, q + r + p + x.q_lora_rank + keys + H * e
  kv = 2 * G * d
  if m.attention == 'qv_ka':
    kv += G * (m.qv_ka.ctx_dim + d)
  # q before and after RoPE, rotated keys, values, the attention output.
  return 2 * H * d + kv + H * d, H * d + kv


GPU_CHIPS = ('h200', 'h100', 'a100', 'l4')


def uses_flash_attention(c, chip: str | None) -> bool:
  """Whether the step would run cuDNN flash attention (no T x T scores kept):
  qvjax.attention.base.dot_product_attention's rule, on a GPU chip."""
  m = c.model
  return (chip in GPU_CHIPS and m.dtype == 'bfloat16' and m.position not in ('alibi', 'agf')
          and m.attention not in config_lib.MLA_PARADIGMS)


def activation_bytes(c, tokens: float, tensor: int, remat: str, flash: bool = False) -> float:
  """Bytes of activations the backward pass keeps, per device (see above);
  with flash attention no (H, T) rows are kept, only a logsumexp per head."""
  m = c.model
  s = jnp.dtype(m.dtype).itemsize
  D, F, L, T, V = m.emb_dim, m.mlp_dim / tensor, m.num_layers, c.seq_len, m.vocab_size / tensor
  attn, attn_dots = _attention_tensors(m, tensor)
  # Two float32 (H, T) rows per token: XLA keeps the softmax's input and output.
  probs = 4 * (m.num_heads / tensor) * (1 if flash else 2 * T)
  none = s * (5 * D + attn + 3 * F) + probs
  per_layer = {'none': none, 'dots': s * (3 * D + attn_dots + 2 * F), 'full': s * D}[remat]
  chunk = c.get('loss_chunk', 0) or T
  logits = 3 * 4 * V * min(chunk, T) / T
  live_block = 0 if remat == 'none' else none
  return tokens * (L * per_layer + live_block + logits + s * 2 * D)


def estimate(c, num_devices: int, chip: str | None = None, mfu: float = 0.4) -> dict:
  """The memory and time figures above, as a dict of numbers (bytes, seconds)."""
  config_lib.validate_static(c)
  data, fsdp, tensor = config_lib.validate_for_devices(c, num_devices)
  mesh = AbstractMesh((data, fsdp, tensor), config_lib.MESH_AXES,
                      axis_types=(AxisType.Auto,) * 3)
  with spmd.logical_axis_rules(sharding.logical_rules(c.model, mesh)):
    setup = train.build(c, mesh)
  (model_abs, opt_abs), (model_sh, opt_sh) = setup.abstract, setup.shardings
  m = c.model
  params = metrics.param_count(model_abs)
  param_bytes = _sharded_bytes(model_abs, model_sh)
  opt_bytes = _sharded_bytes(opt_abs, opt_sh)
  batch = config_lib.global_batch_size(c, num_devices)
  tokens = batch * c.seq_len / (data * fsdp * c.grad_accum_steps)
  flash = uses_flash_attention(c, chip)
  acts = {r: activation_bytes(c, tokens, tensor, r, flash) for r in config_lib.REMAT}
  flops = metrics.train_flops_per_token(m, c.seq_len) * batch * c.seq_len
  peak = metrics.published_peak(chip, m.dtype) if chip else None
  out = {
      'config': c.name, 'attention': m.attention, 'devices': num_devices,
      'mesh': {'data': data, 'fsdp': fsdp, 'tensor': tensor},
      'params': params, 'param_bytes_total': params * 4,
      'per_device': {
          'params': param_bytes, 'grads': param_bytes, 'optimizer': opt_bytes,
          'activations': acts[c.remat],
          'activations_by_remat': acts,
          'batch': batch * c.seq_len * 4 * 5 / (data * fsdp),
      },
      'remat': c.remat, 'grad_accum_steps': c.grad_accum_steps, 'loss_chunk': c.loss_chunk,
      'flash_attention': flash,
      'tokens_per_step': batch * c.seq_len,
      'kv_cache_bytes_per_1k_tokens': decode.cache_bytes_per_token(m) * 1024,
      'train_flops_per_step': flops,
  }
  per = out['per_device']
  if c.grad_accum_steps > 1:
    per['grads'] *= 2  # The running sum and one microbatch's gradients.
  per['total'] = per['params'] + per['grads'] + per['optimizer'] + per['activations'] + \
      per['batch']
  if peak:
    out.update(chip=chip, peak_flops_per_device=peak, assumed_mfu=mfu,
               step_time_s=flops / (num_devices * peak * mfu))
  return out


def format_estimate(e: dict) -> str:
  gib = lambda b: f'{b / 2 ** 30:.2f} GiB'
  per = e['per_device']
  mesh = ' x '.join(f'{k}={v}' for k, v in e['mesh'].items())
  acts = ', '.join(f'{k} {gib(v)}' for k, v in per['activations_by_remat'].items())
  lines = [
      f'{e["config"]} ({e["attention"]}): {e["params"] / 1e6:.1f}M params, '
      f'{e["devices"]} devices ({mesh})',
      f'  per device: params {gib(per["params"])}, grads {gib(per["grads"])}, AdamW '
      f'{gib(per["optimizer"])}, activations {gib(per["activations"])} '
      f'(remat={e["remat"]}, grad_accum_steps={e["grad_accum_steps"]}, '
      f'loss_chunk={e["loss_chunk"]}{", flash attention" if e["flash_attention"] else ""}) '
      f'-> total {gib(per["total"])}',
      f'  activations by remat: {acts}',
      f'  KV cache: {e["kv_cache_bytes_per_1k_tokens"] / 2 ** 20:.1f} MiB per 1k tokens of '
      'context per sequence',
  ]
  if 'step_time_s' in e:
    lines.append(f'  step ({e["tokens_per_step"]} tokens, '
                 f'{e["train_flops_per_step"] / 1e15:.2f} PFLOP): {e["step_time_s"]:.2f} s at '
                 f'{e["assumed_mfu"]:.0%} MFU of {e["peak_flops_per_device"] / 1e12:.0f} '
                 f'TFLOP/s per {e["chip"]}')
  return '\n'.join(lines)


def compiled_memory(c, mesh) -> dict:
  """XLA's memory_analysis() of the compiled train step for abstract inputs
  on `mesh` (real or fake devices): compiled, never run."""
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(c.model, mesh)):
    setup = train.build(c, mesh)
    step = train.make_train_step(setup, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         setup.abstract, setup.shardings)
    batch_sh = sharding.batch_sharding(mesh)
    B, T = config_lib.global_batch_size(c, mesh.size), c.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), np.float32 if k == 'weights' else np.int32,
                                     sharding=batch_sh)
             for k in ('inputs', 'targets', 'positions', 'segment_ids', 'weights')}
    mem = step.lower(state, batch).compile().memory_analysis()
  return memory_dict(mem)


def memory_dict(mem) -> dict:
  out = {k: int(getattr(mem, f'{k}_size_in_bytes')) for k in
         ('argument', 'output', 'alias', 'temp', 'generated_code')}
  # Donated state: outputs alias arguments, so live memory is args + temps.
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  peak = int(getattr(mem, 'peak_memory_in_bytes', 0) or 0)
  if peak:
    out['peak'] = peak
  return out
