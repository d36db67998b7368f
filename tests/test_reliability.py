"""Runs that survive kill -9 and damaged checkpoints without losing more
than one checkpoint interval, and never silently deleting anything."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def command(workdir, data_dir, *args):
  return [sys.executable, '-m', 'qvjax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
          '--config.log_every_steps=1', '--config.sample.max_new_tokens=0',
          '--config.num_train_steps=12', '--config.checkpoint_every_steps=2',
          '--config.eval_every_steps=100', *args]


def env():
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')


def run(workdir, data_dir, *args):
  return subprocess.run(command(workdir, data_dir, *args), cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=600)


def losses(workdir):
  """Step -> loss, the last run's value where a resumed run redid a step."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for row in map(json.loads, f):
      if 'loss' in row:
        out[row['step']] = row['loss']
  return out


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp('straight')
  result = run(workdir, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def kill_when(workdir, data_dir, ready):
  proc = subprocess.Popen(command(workdir, data_dir), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def finished_steps(workdir):
  ckpt = os.path.join(workdir, 'checkpoints')
  return [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []


def checkpoint_tmp_dirs(workdir):
  ckpt = os.path.join(workdir, 'checkpoints')
  return [d for d in os.listdir(ckpt) if 'tmp' in d] if os.path.isdir(ckpt) else []


@pytest.mark.parametrize('kill_point', ['step 5 logged', 'async save in flight'])
def test_kill_9_then_rerun_gives_the_uninterrupted_losses(tmp_path, data_dir, uninterrupted,
                                                          kill_point):
  workdir = tmp_path / 'w'
  if kill_point == 'step 5 logged':
    ready = lambda: (workdir / 'metrics.jsonl').exists() and max(losses(workdir), default=0) >= 5
  else:  # The first moment a save's temporary directory exists, once one save is done.
    ready = lambda: bool(checkpoint_tmp_dirs(workdir)) and finished_steps(workdir)
  kill_when(workdir, data_dir, ready)
  result = run(workdir, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step' in result.stdout
  resumed_at = int(result.stdout.split('Resuming from the checkpoint at step ')[1].split()[0])
  assert resumed_at >= 2  # At most one interval (2 steps) of work redone.
  want, got = losses(uninterrupted), losses(workdir)
  assert sorted(got) == list(range(1, 13))
  # Same params, optimiser moments and data position after the restore: the
  # computation is identical, so the losses are bitwise equal on CPU.
  assert [got[s] for s in range(resumed_at + 1, 13)] == [want[s] for s in range(resumed_at + 1, 13)]


@pytest.mark.parametrize('damage', ['truncate a params file', 'delete the opt_state item'])
def test_damaged_newest_checkpoint_is_set_aside_and_an_older_one_used(tmp_path, data_dir,
                                                                      damage):
  workdir = tmp_path / 'w'
  first = run(workdir, data_dir, '--config.num_train_steps=6')
  assert first.returncode == 0, first.stderr[-3000:]
  newest = workdir / 'checkpoints' / '6'
  if damage.startswith('truncate'):
    files = sorted((p for p in (newest / 'params').rglob('*') if p.is_file()),
                   key=lambda p: p.stat().st_size)
    with open(files[-1], 'r+b') as f:
      f.truncate(files[-1].stat().st_size // 3)
  else:
    import shutil
    shutil.rmtree(newest / 'opt_state')
  result = run(workdir, data_dir, '--config.num_train_steps=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'warning: Checkpoint step 6 is damaged' in result.stdout
  assert 'Resuming from the checkpoint at step 4' in result.stdout
  assert (workdir / 'damaged_checkpoints' / '6').is_dir()  # Kept for the user.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6', '8'] or \
      '8' in os.listdir(workdir / 'checkpoints')


def test_eval_of_a_checkpoint_with_another_model_shape_names_the_key(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  assert run(workdir, data_dir, '--config.num_train_steps=2').returncode == 0
  result = run(workdir, data_dir, '--mode=eval', '--config.model.mlp_dim=48')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: config.model.mlp_dim=48 is invalid: the checkpoint at step 2 has model.mlp_dim=64")
