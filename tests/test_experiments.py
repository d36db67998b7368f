"""The experiment runner (qvjax.experiments), its report (qvjax.results) and
the attention inspector (qvjax.inspect) at tiny scale: the suite lists the
expected runs, a 2-run suite trains end to end, finished runs are skipped, an
interrupted run resumes to the same numbers, the table and the plot are
written, and attention maps come out as PNGs and text with probabilities
that are causal and sum to 1."""

import csv
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from configs.experiments import paper
from qvjax import experiments, results
from qvjax.attention import make_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RUNS = ['qkv', 'gqa', 'mqa', 'mla', 'qv', 'qv_gqa', 'qv_ka_c0', 'qv_ka_c1', 'qv_ka_c2',
              'mla_qv', 'qkv_agf', 'qv_agf', 'qkv_sin', 'qv_sin']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def child_env():
  # One CPU device per cell: the suite's machinery is under test, not sharding.
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
              JAX_PLATFORMS='cpu')


def suite(workdir, data_dir, *args, timeout=300):
  cmd = [sys.executable, '-m', 'qvjax.experiments', '--suite=paper', '--scale=tiny',
         f'--workdir={workdir}', '--set', f'dataset.data_dir={data_dir}', *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=child_env())


def metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# --- The suite as data ------------------------------------------------------


def test_dry_run_lists_every_run_and_seed(tmp_path, capsys):
  assert experiments.main(['--scale=tiny', '--seeds=2', f'--workdir={tmp_path}',
                           '--dry-run']) == 0
  out = capsys.readouterr().out
  rows = [line.split() for line in out.splitlines()[2:]]
  assert [(r[1], int(r[2])) for r in rows] == [(n, s) for s in (0, 1) for n in PAPER_RUNS]
  assert all(r[3] == 'new' for r in rows)
  assert f'--config=configs/experiments/paper.py:tiny,qv_ka_c1,1 --workdir={tmp_path}/' \
         'qv_ka_c1/seed1' in out
  assert not os.listdir(tmp_path)  # A dry run writes nothing.


def test_launcher_takes_qvjax_main_flags(tmp_path, capsys):
  assert experiments.main(['--scale=tiny', '--only=qv', f'--workdir={tmp_path}', '--dry-run',
                           '--launcher=launch/local.sh 2', '--set', 'mesh.data=2']) == 0
  out = capsys.readouterr().out
  assert (f' launch/local.sh 2 --config=configs/experiments/paper.py:tiny,qv,0 '
          f'--workdir={tmp_path}/qv/seed0 --config.mesh.data=2') in out


def test_shards_split_the_cells(tmp_path, capsys):
  seen = []
  for i in range(3):
    assert experiments.main(['--scale=tiny', '--seeds=2', f'--workdir={tmp_path}', '--dry-run',
                             f'--shard={i}/3']) == 0
    seen += [(r.split()[1], r.split()[2]) for r in capsys.readouterr().out.splitlines()[2:]]
  assert sorted(seen) == sorted((n, str(s)) for s in (0, 1) for n in PAPER_RUNS)


@pytest.mark.parametrize('scale', ['small', 'medium', 'large'])
def test_every_scale_is_a_valid_suite(scale, tmp_path, capsys):
  assert experiments.main([f'--scale={scale}', f'--workdir={tmp_path}', '--dry-run']) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2 + 14 * paper.SCALES[scale]['seeds']


def test_runs_differ_only_in_the_model():
  """Same tokens, schedule, data and seed for every run of a scale and seed."""
  base = paper.get_config('small,qkv,1').to_dict()
  for name in PAPER_RUNS:
    c = paper.get_config(f'small,{name},1').to_dict()
    assert {k for k in c if c[k] != base[k]} <= {'model', 'name'}, name
    assert c['seed'] == 1
  m = {n: paper.get_config(f'small,{n},0').model for n in PAPER_RUNS}
  assert (m['qkv'].num_kv_heads, m['gqa'].num_kv_heads, m['mqa'].num_kv_heads) == (4, 2, 1)
  assert [m[f'qv_ka_c{i}'].qv_ka.ctx_dim for i in range(3)] == [0, 64, 128]
  assert {n: m[n].position for n in ('qkv_agf', 'qv_agf', 'qkv_sin', 'qv_sin')} == {
      'qkv_agf': 'agf', 'qv_agf': 'agf', 'qkv_sin': 'sinusoidal', 'qv_sin': 'sinusoidal'}
  assert [paper.baseline(n) for n in ('mla_qv', 'qv_agf', 'qv_sin')] == [
      'qkv', 'qkv_agf', 'qkv_sin']


def test_small_scale_facts_match_docs_attention():
  """The bracketed *_small figures of docs/attention.md, per layer x 4 layers."""
  facts = {n: results.model_facts(paper.get_config(f'small,{n},0'))
           for n in ('qkv', 'gqa', 'mqa', 'qv', 'qv_ka_c1', 'mla', 'mla_qv')}
  assert {n: f['params_attention'] // 4 for n, f in facts.items()} == {
      'qkv': 262_144, 'gqa': 196_608, 'mqa': 163_840, 'qv': 196_608, 'qv_ka_c1': 294_912,
      'mla': 270_464, 'mla_qv': 237_696}
  assert {n: f['cache_bytes_per_token'] for n, f in facts.items()} == {
      'qkv': 8192, 'gqa': 4096, 'mqa': 2048, 'qv': 4096, 'qv_ka_c1': 8192, 'mla': 2560,
      'mla_qv': 2560}


@pytest.mark.parametrize('args,needle', [
    (['--only=qkv,kqv'], '--only'),
    (['--scale=huge'], '--scale=huge'),
    (['--set', 'model.nope=1'], '--set model.nope=1'),
    (['--set', 'learning_rate=-1.0'], 'learning_rate'),
])
def test_bad_usage_is_one_line_and_exit_code_2(tmp_path, capsys, args, needle):
  assert experiments.main([f'--workdir={tmp_path}', '--dry-run', *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0]


def fake_cell(cell, losses, eval_loss, finished=True):
  """A workdir as a finished (or partial) qvjax.main run leaves it."""
  n = cell.config.num_train_steps
  os.makedirs(os.path.join(cell.workdir, 'checkpoints', str(n if finished else n // 2)))
  with open(os.path.join(cell.workdir, 'metrics.jsonl'), 'w') as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({'step': step, 'loss': loss, 'tokens_per_s': 1000.0 + step}) + '\n')
    if finished:
      f.write(json.dumps({'step': n, 'eval_loss': eval_loss,
                          'eval_perplexity': math.exp(eval_loss)}) + '\n')


def test_report_statistics_over_seeds(tmp_path):
  cells = experiments.make_cells(paper, 'configs/experiments/paper.py', 'tiny', 2,
                                 str(tmp_path), ['qkv', 'qv', 'qv_agf'], [])
  evals = {('qkv', 0): 4.0, ('qkv', 1): 4.2, ('qv', 0): 4.1, ('qv', 1): 4.25,
           ('qv_agf', 0): 4.3}
  for cell in cells:
    key = (cell.name, cell.seed)
    fake_cell(cell, np.linspace(7.0, evals.get(key, 5.0), 6), evals.get(key, 5.0),
              finished=key in evals)
  facts = {c.name: results.model_facts(c.config) for c in cells}
  meta = {'suite': 'paper', 'scale': 'tiny', 'seeds': 2, 'workdir': str(tmp_path),
          'command': 'python -m qvjax.experiments ...'}
  results.write(paper, cells, facts, meta)
  with open(tmp_path / 'results.csv') as f:
    rows = {r['run']: r for r in csv.DictReader(f)}
  qv = rows['qv']
  assert float(qv['eval_loss_mean']) == pytest.approx(4.175)
  assert float(qv['eval_loss_std']) == pytest.approx(np.std([4.1, 4.25], ddof=1))
  paired = [100 * (math.exp(4.1 - 4.0) - 1), 100 * (math.exp(4.25 - 4.2) - 1)]
  assert float(qv['dppl_pct_mean']) == pytest.approx(np.mean(paired))
  assert float(qv['dppl_pct_std']) == pytest.approx(np.std(paired, ddof=1))
  assert float(qv['tokens_per_s']) == pytest.approx(1003.5)
  # qv_agf: one seed finished, its baseline (qkv_agf) not in this suite.
  assert rows['qv_agf']['seeds_finished'] == '1' and rows['qv_agf']['dppl_pct_mean'] == ''
  md = (tmp_path / 'results.md').read_text()
  assert '- qv_agf_seed1: partial (checkpoint at step 3)' in md
  assert '| qkv | QKV (MHA) | rope |' in md and '| baseline |' in md
  assert (tmp_path / 'loss_curves.png').read_bytes().startswith(b'\x89PNG')


# --- End to end -------------------------------------------------------------


@pytest.mark.slow
def test_suite_trains_reports_skips_and_resumes(tmp_path, data_dir):
  workdir = tmp_path / 'suite'
  first = suite(workdir, data_dir, '--only=qkv,qv')
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert first.stdout.count('starting') == 2

  # The table.
  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == results.CSV_COLUMNS
  assert [r['run'] for r in rows] == ['qkv', 'qv']
  numeric = ['params_attention', 'params_total', 'flops_per_token', 'cache_bytes_per_token',
             'eval_loss_mean', 'eval_ppl_mean', 'dppl_pct_mean', 'tokens_per_s', 'wall_s']
  for r in rows:
    assert all(math.isfinite(float(r[k])) for k in numeric), r
    assert r['seeds_finished'] == '1' and r['eval_loss_std'] == ''  # A std needs 2 seeds.
    assert math.isclose(float(r['eval_ppl_mean']), math.exp(float(r['eval_loss_mean'])),
                        rel_tol=1e-4)
  qkv, qv = rows
  assert float(qkv['dppl_pct_mean']) == 0.0
  assert math.isclose(float(qv['dppl_pct_mean']),
                      100 * (float(qv['eval_ppl_mean']) / float(qkv['eval_ppl_mean']) - 1),
                      rel_tol=1e-6)
  assert int(qv['cache_bytes_per_token']) * 2 == int(qkv['cache_bytes_per_token'])
  md = (workdir / 'results.md').read_text()
  assert '| qkv | QKV (MHA) | rope |' in md and '| qv | QV | rope |' in md
  assert '![loss curves](loss_curves.png)' in md and 'Not finished' not in md
  png = (workdir / 'loss_curves.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 10_000
  # Both cells got the suite's tokenizer.
  shared = (workdir / 'tokenizer' / 'spm.model').read_bytes()
  assert all((workdir / n / 'seed0' / 'tokenizer' / 'spm.model').read_bytes() == shared
             for n in ('qkv', 'qv'))

  assert not (workdir / 'qv' / 'seed0' / experiments.RUNNING).exists()

  # A second invocation starts nothing.
  log_lines = (workdir / 'suite_log.jsonl').read_text().count('\n')
  again = suite(workdir, data_dir, '--only=qkv,qv')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('finished, skipped') == 2 and 'starting' not in again.stdout
  assert (workdir / 'suite_log.jsonl').read_text().count('\n') == log_lines

  # An interrupted cell (its last checkpoint is step 3) resumes, to the same numbers.
  before = metric_rows(workdir / 'qv' / 'seed0')
  shutil.rmtree(workdir / 'qv' / 'seed0' / 'checkpoints' / '6')
  resumed = suite(workdir, data_dir, '--only=qkv,qv')
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert 'qkv seed 0 (qkv G=4 rope): finished, skipped' in resumed.stdout
  assert 'qv seed 0 (qv G=4 rope): resuming from step 3' in resumed.stdout
  assert 'Resuming from the checkpoint at step 3' in (workdir / 'logs' / 'qv_seed0.log').read_text()
  after = metric_rows(workdir / 'qv' / 'seed0')[len(before):]
  assert [r['step'] for r in after if 'loss' in r] == [4, 5, 6]
  old = {r['step']: r['loss'] for r in before if 'loss' in r}
  np.testing.assert_allclose([r['loss'] for r in after if 'loss' in r],
                             [old[s] for s in (4, 5, 6)], rtol=1e-5)
  with open(workdir / 'results.csv') as f:
    assert [float(r['eval_loss_mean']) for r in csv.DictReader(f)] == [
        float(qkv['eval_loss_mean']), pytest.approx(float(qv['eval_loss_mean']), rel=1e-5)]

  # Looking inside the QV model.
  out = tmp_path / 'inspect'
  shown = subprocess.run(
      [sys.executable, '-m', 'qvjax.inspect', 'attention', f'--workdir={workdir}/qv/seed0',
       '--text=There is a beautiful girl.', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=child_env())
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert sorted(p for p in os.listdir(out) if p.endswith('.png')) == [
      'all_layers.png', 'layer0.png', 'layer1.png']
  assert 'qv (rope, 4 KV heads), step 6' in shown.stdout
  assert 'layer 1 head 3:' in shown.stdout and "'<s>' -> '<s>' 1.00" in shown.stdout
  saved = np.load(out / 'probs.npz')
  probs, T = saved['probs'], len(saved['tokens'])
  assert probs.shape == (2, 4, T, T) and T > 3
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(probs, 1) == 0.0)


@pytest.mark.slow
def test_a_signal_stops_the_suite_and_the_same_command_resumes(tmp_path, data_dir):
  workdir = tmp_path / 'suite'
  args = ['--only=mqa', '--set', 'num_train_steps=40']
  cmd = [sys.executable, '-m', 'qvjax.experiments', '--scale=tiny', f'--workdir={workdir}',
         '--set', f'dataset.data_dir={data_dir}', *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=child_env())
  log = workdir / 'logs' / 'mqa_seed0.log'
  deadline = time.monotonic() + 120
  # 'train:' is the progress bar: the cell has set up and handles signals.
  while not (log.exists() and 'train:' in log.read_text()):
    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
    time.sleep(0.2)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 3, out
  stopped = int(re.search(r'stopped at step (\d+)', out).group(1))
  assert 1 <= stopped < 40
  assert 'Stopped by signal' in log.read_text()
  again = suite(workdir, data_dir, *args)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert f'resuming from step {stopped}' in again.stdout
  steps = [r['step'] for r in metric_rows(workdir / 'mqa' / 'seed0') if 'loss' in r]
  assert steps[-1] == 40 and set(steps) == set(range(1, 41))


def test_a_cell_still_being_trained_is_not_started_twice(tmp_path, data_dir, capsys):
  cell = tmp_path / 'suite' / 'qv' / 'seed0'
  cell.mkdir(parents=True)
  orphan = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'qvjax'])
  try:
    (cell / experiments.RUNNING).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': orphan.pid}))
    assert experiments.main(['--scale=tiny', '--only=qv', f'--workdir={tmp_path}/suite',
                             '--set', f'dataset.data_dir={data_dir}']) == 1
    assert f'already being trained by pid {orphan.pid}' in capsys.readouterr().out
  finally:
    orphan.kill()
    orphan.wait()
  assert experiments.running_elsewhere(experiments.make_cells(
      paper, 'x.py', 'tiny', 1, str(tmp_path / 'suite'), ['qv'], [])[0]) is None


# --- Attention probabilities ------------------------------------------------


def output_from_probs(attn, x, positions, probs):
  """The attention output rebuilt from the probabilities and the values."""
  cfg = attn.cfg
  if cfg.attention in ('mla', 'mla_qv'):
    latent = attn.cache_entries(x, positions)['latent']
    v = jnp.einsum('bsc,che->bshe', latent, attn.w_uv_CHe[...])
    return jnp.einsum('bhts,bshe,hed->btd', probs, v, attn.w_o_HeD[...])
  _, v = attn.keys_values(attn.cache_entries(x, positions), positions)
  v = jnp.repeat(v, cfg.num_heads // cfg.num_kv_heads, axis=2)
  return jnp.einsum('bhts,bshk,hkd->btd', probs, v, attn.w_o_HdD[...])


PARADIGMS = [('qkv', 4, 8), ('qkv', 2, 8), ('qkv', 1, 8), ('qv', 2, 8), ('qv_ka', 4, 0),
             ('qv_ka', 2, 8), ('mla', 4, 8), ('mla_qv', 4, 8)]
CASES = ([(p, 'rope') for p in PARADIGMS]
         + list(itertools.product([PARADIGMS[1], PARADIGMS[5], PARADIGMS[7]],
                                  ['alibi', 'agf', 'sinusoidal', 'none'])))


@pytest.mark.parametrize('paradigm,position', CASES)
def test_attention_probs_are_the_forward_pass(paradigm, position):
  attention, kv_heads, ctx = paradigm
  m = tiny.get_config().model
  m.attention, m.num_kv_heads, m.qv_ka.ctx_dim, m.position = attention, kv_heads, ctx, position
  attn = make_attention(m, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, m.emb_dim))
  # Row 0 packs two documents: no attention across them, positions restart.
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2], list(range(7))])
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2], [1] * 7])
  probs = attn.attention_probs(x, positions, segments)
  assert probs.shape == (2, m.num_heads, 7, 7) and probs.dtype == jnp.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert float(jnp.max(jnp.triu(probs, 1))) == 0.0  # Causal.
  assert float(jnp.max(probs[0, :, 4:, :4])) == 0.0  # Within the document.
  np.testing.assert_allclose(output_from_probs(attn, x, positions, probs),
                             attn(x, positions, segments), atol=2e-6)
