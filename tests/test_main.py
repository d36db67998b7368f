"""The main job end to end on configs/tiny.py: train, evaluate, checkpoint,
resume, sample; bad input refused with one line and exit code 2."""

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def run(workdir, data_dir, *overrides, timeout=600):
  cmd = [sys.executable, '-m', 'qvjax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
         '--config.log_every_steps=1', *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.mark.slow
def test_train_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  first = run(straight, data_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'Final eval loss' in first.stdout and '--- sample ---' in first.stdout
  assert sorted(os.listdir(straight / 'checkpoints')) == ['3', '6']
  assert any(f.startswith('events') for f in os.listdir(straight / 'tb'))

  half = run(split, data_dir, '--config.num_train_steps=3')
  assert half.returncode == 0, half.stderr[-3000:]
  resumed = run(split, data_dir, '--config.num_train_steps=6')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 3' in resumed.stdout
  a, b = losses(straight), losses(split)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  # Params, optimiser state and the data position are all restored, so the
  # resumed steps are the same computation: equal to float32 rounding.
  np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-6)

  again = run(split, data_dir, '--config.num_train_steps=6')
  assert again.returncode == 0 and 'Already trained to step 6' in again.stdout


@pytest.mark.parametrize('override,needle', [
    ('--config.seq_len=abc', 'flag --config.seq_len=abc'),
    ('--config.nonexistent=3', 'unknown config key nonexistent'),
    ('--config.seed=-1', 'config.seed=-1'),
    ('--config.name=', "config.name=''"),
    ('--temperature=-2', 'config.sample.temperature=-2.0'),
    ('--config.model.attention=kqv', 'config.model.attention'),
    ('--config.model.num_kv_heads=3', 'config.model.num_kv_heads=3'),
    ('--config.mesh.data=3', 'config.mesh'),
    ('--config.model.position=learned', 'config.model.position'),
    ('--config.model.attention=mla_qv --config.model.mla.v_head_dim=4',
     'config.model.mla.qk_nope_head_dim'),
    ('--config.learning_rate=-1.0', 'config.learning_rate'),
])
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, data_dir, override, needle):
  result = run(tmp_path / 'w', data_dir, *override.split(), timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert not (tmp_path / 'w').exists()  # Nothing written for a bad config.


def test_workdir_of_another_model_is_refused(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  from configs import tiny
  from qvjax import workdir as workdir_lib
  other = tiny.get_config()
  other.model.num_layers = 3
  workdir_lib.claim(str(workdir), other, write=True)
  result = run(workdir, data_dir, timeout=120)
  assert result.returncode == 2
  assert 'model.num_layers=2' in result.stderr and 'holds a run' in result.stderr
  assert os.listdir(workdir) == ['run.json']
  # --fresh moves the old run aside (never deletes it) and starts over.
  fresh = run(workdir, data_dir, '--fresh', '--config.num_train_steps=1', timeout=300)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  aside = [p for p in os.listdir(tmp_path) if p.startswith('w.old-')]
  assert len(aside) == 1 and os.listdir(tmp_path / aside[0]) == ['run.json']
  assert json.load(open(workdir / 'run.json'))['model']['num_layers'] == 2


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_nonfinite_loss_policy(tmp_path, data_dir, policy):
  # A learning rate of 1e30 overflows the weights within a few steps.
  workdir = tmp_path / 'w'
  result = run(workdir, data_dir, '--config.learning_rate=1e30', '--config.warmup_steps=1',
               '--config.checkpoint_every_steps=1', f'--config.nonfinite_policy={policy}',
               '--config.max_consecutive_nonfinite=2', '--config.num_train_steps=12')
  assert result.returncode == 1, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  match = re.search(r'error: step (\d+): (loss|gradient of \S+).* is not finite', line)
  assert match, line
  bad = int(match.group(1))
  saved = sorted(int(s) for s in os.listdir(workdir / 'checkpoints'))
  assert saved and max(saved) < bad  # The bad state never reached disk.
  if policy == 'skip':
    assert '3 in a row' in line  # max_consecutive_nonfinite=2 were skipped first
