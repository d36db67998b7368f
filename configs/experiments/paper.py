"""The paper suite: every attention paradigm trained on the same budget.

"QV May Be Enough" (arXiv 2603.15665) compared QKV, QV and QV-Ka on
translation; this suite asks the same of decoder-only pretraining, with MQA,
GQA and MLA beside them, and repeats QKV vs QV under three position schemes
(the paper's "positional interference" claim). Run it with

    python -m qvjax.experiments --suite=paper --scale=small --seeds=2

(docs/results.md). The file is data: RUNS say what differs between runs,
SCALES what is shared by all runs of a scale. Every run of a scale and seed
index has the same config except `model` (same tokens, schedule, data order
and init seed), and the suite's runner passes every run the same
tokenizer. Any single cell is also a plain qvjax.main config:

    python -m qvjax.main --config=configs/experiments/paper.py:small,qv_ka_c1,0 --workdir=W

i.e. `SCALE,RUN,SEED` after the colon (SEED is the seed index, config.seed).

What a suite module provides (qvjax.experiments reads only this):
  SCALES    name -> {'config': () -> ConfigDict, 'seeds': default seed count,
                     'about': one line}
  RUNS      [{'name', 'label', 'position',
              'model': (scale's model config) -> {dotted model key: value}}]
  baseline(name) -> the run each one is compared with (None for none)
  get_config('SCALE,RUN,SEED') -> the cell's full config
"""

import ml_collections

from configs import default, tiny

# --- Scales -----------------------------------------------------------------


def _suite_knobs(c, name: str):
  c.name = name
  c.sample.max_new_tokens = 0  # No sample at the end: sample later with --mode=generate.
  return c


def _tiny():
  """CI: seconds per run."""
  c = _suite_knobs(tiny.get_config(), 'paper_tiny')
  c.model.num_kv_heads = c.model.num_heads  # MHA unless a run says otherwise.
  c.num_train_steps = 6
  c.warmup_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.max_checkpoints_to_keep = 2
  return c


def _small():
  """This project's 2-core CPU: at most ~90 minutes for one seed of all 14
  runs. The model is exactly the *_small one (configs/small.py: D 256, 4
  layers, 4 heads of 64, ~3.7M parameters, 32 x 128 tokens a step), so the
  figures line up with docs/attention.md's bracketed numbers. Only the step
  count is cut to fit the budget; docs/results.md has the arithmetic:
  14 runs x (250 steps x ~1.1 s + ~45 s start-up, compile and evals)
  ~= 75 minutes on a quiet machine as estimated (54 minutes measured for a
  seed, docs/results.md), 1.02M training tokens per run (under one
  epoch of Shakespeare's train split, so no document is seen twice)."""
  c = _suite_knobs(default.get_config(), 'paper_small')
  c.num_train_steps = 250
  c.warmup_steps = 25
  c.log_every_steps = 5  # Finer loss curves; the step reads its loss anyway.
  c.eval_every_steps = 50  # 5 evaluations x 8 batches (32k tokens).
  c.checkpoint_every_steps = 50  # An interrupted run loses at most ~1 minute.
  c.max_checkpoints_to_keep = 2
  return c


def _medium():
  """One accelerator host (a GPU or a TPU v4-8/v5e-8): ~40M parameters,
  655M tokens of lm1b (prepare it first: docs/data.md), bfloat16."""
  c = _suite_knobs(default.get_config(), 'paper_medium')
  m = c.model
  m.num_layers, m.emb_dim, m.num_heads, m.num_kv_heads, m.head_dim = 8, 512, 8, 8, 64
  m.mlp_dim, m.vocab_size, m.dtype = 1408, 8192, 'bfloat16'
  m.qv_ka.ctx_dim = 64
  m.mla.kv_lora_rank, m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim = 256, 64, 32
  m.mla.v_head_dim = 64
  c.dataset.name, c.dataset.eval_split = 'lm1b', 'test'
  c.tokenizer.train_max_chars = 20_000_000
  c.seq_len, c.global_batch_size = 512, 128
  c.num_train_steps, c.warmup_steps = 10_000, 500
  c.learning_rate = 2e-3
  c.log_every_steps, c.eval_every_steps, c.eval_batches = 50, 1000, 32
  c.checkpoint_every_steps = 1000
  return c


def _large():
  """A TPU pod slice or a GPU cluster: ~330M parameters (the size of the
  related "three projections" study), 5.2B tokens of c4/en, bfloat16.
  Shard the parameters with --set=mesh.fsdp=N where they do not fit."""
  c = _suite_knobs(default.get_config(), 'paper_large')
  m = c.model
  m.num_layers, m.emb_dim, m.num_heads, m.num_kv_heads, m.head_dim = 24, 1024, 16, 16, 64
  m.mlp_dim, m.vocab_size, m.dtype = 2816, 32768, 'bfloat16'
  m.qv_ka.ctx_dim = 64
  m.mla.kv_lora_rank, m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim = 512, 64, 64
  m.mla.v_head_dim = 64
  c.dataset.name = 'c4/en'
  c.tokenizer.train_max_chars = 50_000_000
  c.seq_len, c.global_batch_size = 1024, 256
  c.num_train_steps, c.warmup_steps = 20_000, 1000
  c.learning_rate = 1e-3
  c.log_every_steps, c.eval_every_steps, c.eval_batches = 100, 2000, 64
  c.checkpoint_every_steps = 1000
  return c


SCALES = {
    'tiny': {'config': _tiny, 'seeds': 1, 'about': 'CI: 2 layers of width 32, 6 steps'},
    'small': {'config': _small, 'seeds': 2,
              'about': '2-core CPU: the *_small model, 250 steps, ~55 min a seed'},
    'medium': {'config': _medium, 'seeds': 2,
               'about': 'one accelerator host: ~40M params, 655M lm1b tokens'},
    'large': {'config': _large, 'seeds': 1,
              'about': 'pod / cluster: ~330M params, 5.2B c4 tokens'},
}

# --- Runs -------------------------------------------------------------------
# 'model' maps the scale's model config to the keys this run changes. KV
# heads are stated relative to the query heads and QV-Ka's context width
# relative to head_dim, so one list serves every scale.


def _gqa(m):
  """GQA's KV heads: a quarter of the query heads (at least 2, at most H / 2)."""
  return max(2, min(m.num_heads // 4, m.num_heads // 2))


def _run(name, label, attention, position='rope', kv=None, ctx=None):
  def model(m):
    out = {'attention': attention, 'position': position}
    if kv is not None:
      out['num_kv_heads'] = kv(m)
    if ctx is not None:
      out['qv_ka.ctx_dim'] = ctx * m.head_dim
    return out
  return {'name': name, 'label': label, 'position': position, 'model': model}


RUNS = [
    _run('qkv', 'QKV (MHA)', 'qkv'),
    _run('gqa', 'QKV GQA', 'qkv', kv=_gqa),
    _run('mqa', 'QKV MQA', 'qkv', kv=lambda m: 1),
    _run('mla', 'MLA', 'mla'),
    _run('qv', 'QV', 'qv'),
    _run('qv_gqa', 'QV + GQA', 'qv', kv=_gqa),
    _run('qv_ka_c0', 'QV-Ka, d_ctx = 0', 'qv_ka', ctx=0),
    _run('qv_ka_c1', 'QV-Ka, d_ctx = d_head', 'qv_ka', ctx=1),
    _run('qv_ka_c2', 'QV-Ka, d_ctx = 2 d_head', 'qv_ka', ctx=2),
    _run('mla_qv', 'MLA-QV (no W_UK)', 'mla_qv'),
    _run('qkv_agf', 'QKV (MHA)', 'qkv', position='agf'),
    _run('qv_agf', 'QV', 'qv', position='agf'),
    _run('qkv_sin', 'QKV (MHA)', 'qkv', position='sinusoidal'),
    _run('qv_sin', 'QV', 'qv', position='sinusoidal'),
]

# Each run is compared with QKV (MHA) under its own position scheme.
_BASELINE_BY_POSITION = {'rope': 'qkv', 'agf': 'qkv_agf', 'sinusoidal': 'qkv_sin'}


def baseline(name: str):
  return _BASELINE_BY_POSITION.get(_find(name)['position'])


def _find(name: str) -> dict:
  for run in RUNS:
    if run['name'] == name:
      return run
  raise ValueError(f'run {name!r} is not in the paper suite: {", ".join(r["name"] for r in RUNS)}')


def get_config(arg: str = 'small,qkv,0') -> ml_collections.ConfigDict:
  try:
    scale, name, seed = arg.split(',')
    seed = int(seed)
  except ValueError:
    raise ValueError(f'config argument {arg!r} is invalid: expected SCALE,RUN,SEED, '
                     'e.g. small,qv,0') from None
  if scale not in SCALES:
    raise ValueError(f'scale {scale!r} is invalid: one of {", ".join(SCALES)}')
  c = SCALES[scale]['config']()
  for key, value in _find(name)['model'](c.model).items():
    section = c.model
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value
  c.name = f'{c.name}_{name}_s{seed}'
  c.seed = seed
  return c
