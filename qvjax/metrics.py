"""FLOPs per token per paradigm, the machine's peak, MFU, and the writers.

FLOPs count multiply-adds as 2 and only matmuls. Training = 3x forward.
Per layer and token, with D = emb_dim, H heads, G KV heads, d = head_dim,
F = mlp_dim, c = qv_ka.ctx_dim, T = seq_len:
  qkv    projections 2 * D * (H d + 2 G d) + 2 * H d D
  qv     projections 2 * D * (H d + G d)   + 2 * H d D
  qv_ka  qv's + 2 * D * G c + 2 * G (c + d) d   (context vector, key rebuild)
  mla    queries 2 D H (n + p), or 2 D q + 2 q H (n + p) with q = q_lora_rank;
         latent and rope key 2 D (r + p); keys and values from the latent
         2 r H (n + e); output 2 H e D  (r = kv_lora_rank, n/p/e = nope/rope/v)
  mla_qv mla's without W_UK: 2 r H n less (n = e)
  all    MLP 2 * 3 * D F;  attention (scores + mix) 2 H (d_qk + d_v) T / 2,
         causal: half the scores; d_qk = d_v = d, for MLA n + p and e.
plus the output head 2 * D * V. docs/metrics.md derives these.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def projection_flops_per_token(m) -> int:
  """Forward matmul FLOPs of one layer's attention projections, per token."""
  D, H, G, d = m.emb_dim, m.num_heads, m.num_kv_heads, m.head_dim
  q_and_o = 2 * D * H * d * 2
  if m.attention == 'qkv':
    return q_and_o + 2 * D * 2 * G * d
  if m.attention == 'qv':
    return q_and_o + 2 * D * G * d
  if m.attention == 'qv_ka':
    c = m.qv_ka.ctx_dim
    return q_and_o + 2 * D * G * (d + c) + 2 * G * (c + d) * d
  if m.attention in ('mla', 'mla_qv'):
    return _mla_projection_flops(m)
  raise ValueError(f'no FLOPs formula for attention={m.attention!r}')


def _mla_projection_flops(m) -> int:
  D, H, x = m.emb_dim, m.num_heads, m.mla
  n, p, e, r, q = (x.qk_nope_head_dim, x.qk_rope_head_dim, x.v_head_dim, x.kv_lora_rank,
                   x.q_lora_rank)
  queries = 2 * D * q + 2 * q * H * (n + p) if q else 2 * D * H * (n + p)
  key_up = 0 if m.attention == 'mla_qv' else 2 * r * H * n
  return queries + 2 * D * (r + p) + key_up + 2 * r * H * e + 2 * H * e * D


def attention_flops_per_token(m, seq_len: int, causal: bool = True) -> int:
  """Scores and the weighted sum of values, per token and layer."""
  if m.attention in ('mla', 'mla_qv'):
    qk, v = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
  else:
    qk = v = m.head_dim
  full = 2 * m.num_heads * (qk + v) * seq_len
  return full // 2 if causal else full


def forward_flops_per_token(m, seq_len: int, causal: bool = True) -> int:
  mlp = 2 * 3 * m.emb_dim * m.mlp_dim
  scores_and_mix = attention_flops_per_token(m, seq_len, causal)
  layer = projection_flops_per_token(m) + mlp + scores_and_mix
  return m.num_layers * layer + 2 * m.emb_dim * m.vocab_size


def train_flops_per_token(m, seq_len: int) -> int:
  return 3 * forward_flops_per_token(m, seq_len)


def measure_peak_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
  """The device's dense matmul rate, measured: the ceiling MFU is judged against
  on CPU (and a sanity figure elsewhere)."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


# Published dense (no sparsity) matmul peaks per chip, FLOP/s; docs/performance.md
# cites them. float32 on NVIDIA is the TF32 tensor-core rate: XLA's default
# precision for float32 matmuls there.
PUBLISHED_PEAKS = {
    'h200': {'bfloat16': 989e12, 'float32': 494e12},  # H200 SXM
    'h100': {'bfloat16': 989e12, 'float32': 494e12},  # H100 SXM
    'a100': {'bfloat16': 312e12, 'float32': 156e12},  # A100 SXM/PCIe
    'l4': {'bfloat16': 121e12, 'float32': 60e12},
    'tpu_v4': {'bfloat16': 275e12, 'float32': 275e12},
    'tpu_v5e': {'bfloat16': 197e12, 'float32': 197e12},
    'tpu_v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'tpu_v6e': {'bfloat16': 918e12, 'float32': 918e12},
}
# jax's device_kind -> the table's key (the first matching substring wins).
DEVICE_KINDS = (('H200', 'h200'), ('H100', 'h100'), ('A100', 'a100'), ('L4', 'l4'),
                ('TPU v4', 'tpu_v4'), ('TPU v5 lite', 'tpu_v5e'), ('TPU v5e', 'tpu_v5e'),
                ('TPU v5', 'tpu_v5p'), ('TPU v6', 'tpu_v6e'))


def chip_of(device) -> str | None:
  """The PUBLISHED_PEAKS key of a jax device, or None (CPU, unknown chips)."""
  if device.platform == 'cpu':
    return None
  for needle, chip in DEVICE_KINDS:
    if needle in device.device_kind:
      return chip
  return None


def published_peak(chip: str | None, dtype='float32') -> float | None:
  """A chip's published dense peak for matmuls in `dtype`, or None if unknown."""
  return PUBLISHED_PEAKS.get(chip, {}).get(jnp.dtype(dtype).name) if chip else None


def peak_flops_per_device(dtype='float32') -> tuple[float, str]:
  """(peak FLOP/s, where it comes from): the published figure on a known
  GPU/TPU, else this device's measured matmul rate in `dtype` (on CPU, the
  whole machine: fake devices share its cores)."""
  device = jax.devices()[0]
  peak = published_peak(chip_of(device), dtype)
  if peak:
    return peak, f'published {chip_of(device)} {jnp.dtype(dtype).name}'
  return measure_peak_flops(jnp.dtype(dtype)), f'measured {jnp.dtype(dtype).name} matmul'


def token_byte_lengths(tokenizer, size: int) -> np.ndarray:
  """UTF-8 bytes each token id stands for (byte pieces 1, control ids 0),
  the denominator of bits per byte; ids beyond the tokenizer count 0."""
  sp = tokenizer.processor
  lengths = np.zeros(size, np.float32)
  for i in range(min(size, sp.get_piece_size())):
    if sp.is_byte(i):
      lengths[i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      lengths[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
  return lengths


def param_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Writer:
  """Scalars from process 0 only (others no-op): TensorBoard events in
  <workdir>/tb and the same numbers as JSON lines in <workdir>/metrics.jsonl,
  for scripts and the experiment runner."""

  def __init__(self, workdir: str, enabled: bool):
    self._tb = self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # Imported only where it writes.
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def scalars(self, step: int, values: dict):
    if self._tb is None:
      return
    values = {k: float(v) for k, v in values.items()}
    for key, value in values.items():
      self._tb.add_scalar(key, value, step)
    self._tb.flush()
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
