"""Several processes joined by jax.distributed on 127.0.0.1 (gloo on CPU):
the same training as one process, checkpoints that evaluate on any
topology, and SIGTERM that saves an agreed step."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/tiny.py', '--config.log_every_steps=1',
        '--config.sample.max_new_tokens=0', '--config.dataset.num_shards=2']
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def env(devices):
  e = dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable, QVJAX_DEVICES=str(devices))
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return e


def single(workdir, data_dir, *args, devices=8, timeout=600):
  cmd = [sys.executable, '-m', 'qvjax.main', *TINY, f'--workdir={workdir}',
         f'--config.dataset.data_dir={data_dir}', *args]
  return subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True, text=True,
                        timeout=timeout)


def local(n, workdir, data_dir, *args, timeout=600):
  cmd = ['bash', 'launch/local.sh', str(n), *TINY, f'--workdir={workdir}',
         f'--config.dataset.data_dir={data_dir}', *args]
  return subprocess.run(cmd, cwd=ROOT, env=env(8), capture_output=True, text=True,
                        timeout=timeout)


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r['loss'] for r in sorted(rows, key=lambda r: r['step']) if 'loss' in r]


def eval_loss(workdir, data_dir, step, *args, devices=8):
  result = single(workdir, data_dir, '--mode=eval', f'--step={step}', *args, devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, f'eval_{step}.json')) as f:
    return json.load(f)['eval_loss']


def test_two_processes_train_like_one_and_their_checkpoint_evaluates_anywhere(
    tmp_path, data_dir):
  mesh = ['--config.mesh.data=2', '--config.mesh.fsdp=4']
  one, two = tmp_path / 'one', tmp_path / 'two'
  r1 = single(one, data_dir, *mesh)
  assert r1.returncode == 0, r1.stderr[-3000:]
  r2 = local(2, two, data_dir, *mesh)
  assert r2.returncode == 0, r2.stdout[-3000:]
  # Same global batches (data.num_shards fixes them whatever the process
  # count); sums over differently split devices reorder float32 adds.
  np.testing.assert_allclose(losses(two), losses(one), rtol=2e-5)
  assert len(losses(two)) == 6

  want = eval_loss(two, data_dir, 6, *mesh)
  for args, devices in ((['--config.mesh.data=1', '--config.mesh.fsdp=8'], 8),
                        (['--config.mesh.data=8'], 8),
                        (['--config.mesh.data=2'], 2)):
    got = eval_loss(two, data_dir, 6, *args, devices=devices)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=str(args))


def wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if os.path.exists(path) and len(losses(workdir)) >= step:
      return
    time.sleep(0.5)
  raise TimeoutError(f'no step {step} in {path}')


def saved_step(stdout):
  match = re.search(r'Stopped by signal: saved step (\d+)', stdout)
  assert match, stdout[-3000:]
  return int(match.group(1))


def test_sigterm_saves_the_next_step_and_the_rerun_resumes(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  args = [sys.executable, '-m', 'qvjax.main', *TINY, f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', '--config.num_train_steps=100000',
          '--config.checkpoint_every_steps=100000']
  proc = subprocess.Popen(args, cwd=ROOT, env=env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  step = saved_step(out)
  assert os.listdir(workdir / 'checkpoints') == [str(step)]
  rerun = single(workdir, data_dir, f'--config.num_train_steps={step + 2}', devices=1)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {step}' in rerun.stdout
  assert len(losses(workdir)) >= step + 2


def test_sigterm_to_one_host_stops_every_host_at_one_agreed_step(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  proc = subprocess.Popen(
      ['bash', 'launch/local.sh', '2', *TINY, f'--workdir={workdir}',
       f'--config.dataset.data_dir={data_dir}', '--config.num_train_steps=100000',
       '--config.checkpoint_every_steps=100000'],
      cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for_step(workdir, 3, proc)
  host1 = subprocess.run(['pgrep', '-f', f'workdir={workdir} .*--process_id=1'],
                         capture_output=True, text=True).stdout.split()
  assert len(host1) == 1
  os.kill(int(host1[0]), signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  step = saved_step(out)
  assert re.search(rf'\[1\].*Stopped by signal at step {step}', out), out[-3000:]
  assert os.listdir(workdir / 'checkpoints') == [str(step)]
