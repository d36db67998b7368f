"""The launch scripts: their dry runs print exactly the commands they would run,
bad usage exits 2 with the usage, and the commands they send to TPU workers
or run under SLURM work when executed here against stand-in programs.

No gcloud, cluster or JAX is used; every test runs in well under a second.
"""

import os
import shlex
import signal
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_POD = ROOT / 'launch' / 'tpu_pod.sh'
TPU_DELETE = ROOT / 'launch' / 'tpu_delete.sh'
SLURM = ROOT / 'launch' / 'slurm.sbatch'
LOCAL = ROOT / 'launch' / 'local.sh'

# Variables the scripts read: none may leak in from the caller's environment.
_OURS = ('TPU_', 'QVJAX_', 'SLURM_', 'SRUN_', 'DRY_RUN', 'PYTHON', 'CUDA_VISIBLE_DEVICES',
         'JAX_LOCAL_DEVICE_IDS')


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
  env.update(extra)
  return env


def run(script, *args, env=None, **kwargs):
  return subprocess.run(['bash', str(script), *args], capture_output=True, text=True,
                        env=_env(**(env or {})), timeout=30, **kwargs)


def commands(stdout):
  """The printed commands as argv lists (comment lines dropped)."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith('#')]


def gcloud_commands(stdout):
  return [c for c in commands(stdout) if c[0] == 'gcloud']


def option(argv, name):
  """The value of --name=VALUE in argv."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


LOC = ['--zone=us-central2-b', '--project=my-proj']
USER_ARGS = ['--config=configs/qv_small.py', '--workdir=gs://bkt/runs/qv',
             "--config.sample.prompt=ROMEO: it's \"$HOME\" & more"]


# --------------------------------------------------------------------------- TPU


def test_tpu_pod_dry_run_prints_every_command():
  r = run(TPU_POD, '--dry-run', '--name=qv', *LOC, '--type=v4-32', '--spot',
          '--env=TFDS_DATA_DIR=gs://bkt/tfds', '--', *USER_ARGS)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  describe, create, pack, scp, setup, start, logs = cmds
  assert describe == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'qv', *LOC,
                      '--format=value(state.state)']
  assert create == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'qv', *LOC,
                    '--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base',
                    '--node-id=qv', '--spot']
  assert pack[:2] == ['git', '-C'] and 'tar' in pack
  tarball = '/tmp/qvjax-src-qv.tar.gz'
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'qv:qvjax-src.tar.gz',
                 *LOC, '--worker=all']
  for c in (setup, start):
    assert c[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'qv']
    assert c[6:9] == [*LOC, '--worker=all']
  assert 'tar -xzf qvjax-src.tar.gz -C qvjax' in option(setup, 'command')
  assert ".venv/bin/python -e '.[gcs]' 'jax[tpu]'" in option(setup, 'command')
  assert '--python 3.12 .venv' in option(setup, 'command')
  assert logs[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'qv', *LOC, '--worker=0']
  assert 'tail -n +1 -F' in option(logs, 'command')


def test_tpu_pod_multislice_uses_queued_resource_ssh_on_every_node():
  r = run(TPU_POD, '--dry-run', '--name=qv', *LOC, '--type=v5litepod-16', '--slices=2',
          '--', '--config=configs/qv_small.py', '--workdir=gs://bkt/r')
  assert r.returncode == 0, r.stderr
  describe, create, scp, setup, start, logs = gcloud_commands(r.stdout)
  assert create == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'qv', *LOC,
                    '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite',
                    '--node-count=2', '--node-prefix=qv']
  assert scp == ['gcloud', 'compute', 'tpus', 'queued-resources', 'scp',
                 '/tmp/qvjax-src-qv.tar.gz', 'qv:qvjax-src.tar.gz', *LOC,
                 '--node=all', '--worker=all']
  for c in (setup, start):
    assert c[:10] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'qv', *LOC,
                      '--node=all', '--worker=all']
  assert logs[:10] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'qv', *LOC,
                       '--node=0', '--worker=0']


@pytest.mark.parametrize('tpu_type,runtime', [('v6e-16', 'v2-alpha-tpuv6e'),
                                              ('v5p-16', 'v2-alpha-tpuv5'),
                                              ('v3-32', 'tpu-ubuntu2204-base')])
def test_tpu_pod_runtime_follows_the_type(tpu_type, runtime):
  r = run(TPU_POD, '--dry-run', '--name=qv', *LOC, f'--type={tpu_type}', '--setup-only')
  assert r.returncode == 0, r.stderr
  create = gcloud_commands(r.stdout)[1]
  assert option(create, 'runtime-version') == runtime


def test_tpu_pod_options_from_the_environment_and_a_git_repo():
  env = dict(TPU_NAME='qv', TPU_ZONE='europe-west4-a', TPU_SPOT='1', TPU_TYPE='v4-8',
             QVJAX_REPO='https://example.org/qvjax.git', QVJAX_REF='v1.0',
             QVJAX_PIP='jax[tpu]==0.10.2 tensorboard', QVJAX_PYTHON='3.11')
  r = run(TPU_POD, '--dry-run', '--config=configs/qv_small.py', '--workdir=gs://b/r', env=env)
  assert r.returncode == 0, r.stderr
  describe, create, setup, start, logs = gcloud_commands(r.stdout)
  assert describe[5:7] == ['qv', '--zone=europe-west4-a']
  assert create[-1] == '--spot' and '--node-id=qv' in create
  remote = option(setup, 'command')
  assert "git clone --quiet https://example.org/qvjax.git qvjax" in remote
  assert 'git -C qvjax checkout --quiet --detach v1.0' in remote
  assert "-e '.[gcs]' 'jax[tpu]==0.10.2' tensorboard" in remote
  assert '--python 3.11 .venv' in remote
  assert 'scp' not in r.stdout
  assert option(start, 'command').endswith('< /dev/null &')


def test_tpu_pod_logs_and_detach():
  r = run(TPU_POD, '--dry-run', '--name=qv', '--zone=z', '--logs')
  assert r.returncode == 0, r.stderr
  (logs,) = gcloud_commands(r.stdout)
  assert logs[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'qv', '--zone=z', '--worker=0']
  r = run(TPU_POD, '--dry-run', '--name=qv', '--zone=z', '--no-queue', '--skip-setup', '--detach',
          '--', '--config=configs/tiny.py', '--workdir=gs://b/r')
  assert r.returncode == 0, r.stderr
  (start,) = gcloud_commands(r.stdout)
  assert start[-2] == '--worker=all'


def test_tpu_pod_warns_about_a_local_workdir():
  r = run(TPU_POD, '--dry-run', '--name=qv', '--zone=z', '--no-queue', '--skip-setup',
          '--', '--config=configs/tiny.py')
  assert r.returncode == 0
  assert 'warning: no --workdir=gs://' in r.stderr


@pytest.mark.parametrize('args,message', [
    (['--zone=z', '--', '--config=c'], '--name (or TPU_NAME) is required'),
    (['--name=qv', '--', '--config=c'], '--zone (or TPU_ZONE) is required'),
    (['--name=qv', '--zone=z', '--no-queue'], 'no qvjax.main flags'),
    (['--name=qv', '--zone=z', '--bogus'], 'unknown option --bogus'),
    (['--name=qv', '--zone=z', '--slices=0', '--', '--config=c'], '--slices=0 is invalid'),
    (['--name=qv', '--zone=z', '--slices=2', '--no-queue', '--', '--config=c'], '--no-queue is invalid'),
    (['--name=Bad_Name', '--zone=z', '--', '--config=c'], '--name=Bad_Name is invalid'),
    (['--name=qv', '--zone=z', '--env=1x', '--', '--config=c'], '--env=1x is invalid'),
    (['--name=qv', '--zone=z', '--type=v9-8', '--', '--config=c'], 'has no default runtime'),
])
def test_tpu_pod_bad_usage_exits_2_with_usage(args, message):
  r = run(TPU_POD, '--dry-run', *args)
  assert r.returncode == 2
  assert message in r.stderr
  assert 'Usage: launch/tpu_pod.sh' in r.stderr
  assert r.stdout == ''


def test_tpu_pod_help():
  r = run(TPU_POD, '--help')
  assert r.returncode == 0
  assert r.stdout.startswith('Train on a Cloud TPU VM')
  assert '--dry-run' in r.stdout and 'launch/tpu_delete.sh' in r.stdout


def test_tpu_delete_dry_run_stops_then_deletes():
  r = run(TPU_DELETE, '--dry-run', '--name=qv', *LOC, '--yes')
  assert r.returncode == 0, r.stderr
  stop, delete = gcloud_commands(r.stdout)
  assert stop[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'qv', *LOC, '--worker=all']
  assert 'kill -TERM "$pid"' in option(stop, 'command')
  assert delete == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'qv', *LOC,
                    '--force', '--quiet']


def test_tpu_delete_variants():
  r = run(TPU_DELETE, '--dry-run', '--name=qv', '--zone=z', '--stop-only', '--slices=2')
  assert r.returncode == 0, r.stderr
  (stop,) = gcloud_commands(r.stdout)
  assert stop[:9] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'qv', '--zone=z',
                      '--node=all', '--worker=all']
  r = run(TPU_DELETE, '--dry-run', '--name=qv', '--zone=z', '--no-stop', '--qr=qr1')
  (delete,) = gcloud_commands(r.stdout)
  assert delete == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'qr1', '--zone=z',
                    '--force']
  r = run(TPU_DELETE, '--dry-run', '--name=qv', '--zone=z', '--no-stop', '--no-queue', '--yes')
  (delete,) = gcloud_commands(r.stdout)
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'qv', '--zone=z', '--quiet']


@pytest.mark.parametrize('args,message', [
    (['--zone=z'], '--name (or TPU_NAME) is required'),
    (['--name=qv'], '--zone (or TPU_ZONE) is required'),
    (['--name=qv', '--zone=z', '--stop-only', '--no-stop'], 'do nothing'),
    (['--name=qv', '--zone=z', '--grace=soon'], '--grace=soon is invalid'),
    (['--name=qv', '--zone=z', '--force'], 'unknown option --force'),
])
def test_tpu_delete_bad_usage_exits_2_with_usage(args, message):
  r = run(TPU_DELETE, '--dry-run', *args)
  assert r.returncode == 2
  assert message in r.stderr and 'Usage: launch/tpu_delete.sh' in r.stderr


def _executable(path, text):
  path.write_text(textwrap.dedent(text))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _remote(tmp_path, command, timeout=20):
  """Runs a worker command as the worker's shell would, in a fake home."""
  return subprocess.run(['bash', '-c', command], cwd=tmp_path, capture_output=True, text=True,
                        env=_env(HOME=str(tmp_path)), timeout=timeout)


def test_tpu_worker_commands_start_stream_and_stop_a_run(tmp_path):
  """The start, log and stop commands the scripts send to each worker, run
  here against a stand-in qvjax: detached start, argv intact, the log
  streamed until the run ends with its exit code, SIGTERM reaching the run."""
  venv = tmp_path / 'qvjax' / '.venv' / 'bin'
  venv.mkdir(parents=True)
  _executable(venv / 'python', f"""\
      #!/usr/bin/env bash
      printf '%s\\n' "$@" > {tmp_path}/argv
      echo "A=$A"
      trap 'echo saved at signal; exit 0' TERM
      if [[ -f {tmp_path}/wait ]]; then while :; do sleep 0.1; done; fi
      echo training done
      exit 3
      """)
  r = run(TPU_POD, '--dry-run', '--name=qv', '--zone=z', '--no-queue', '--skip-setup',
          '--env=A=x y', '--', *USER_ARGS)
  start, logs = (option(c, 'command') for c in gcloud_commands(r.stdout))

  t = time.monotonic()
  assert _remote(tmp_path, start).returncode == 0
  streamed = _remote(tmp_path, logs)
  assert time.monotonic() - t < 15
  assert streamed.returncode == 3, streamed.stderr
  assert 'A=x y\ntraining done\n' in streamed.stdout
  assert streamed.stdout.endswith('qvjax exited with code 3\n')
  assert (tmp_path / 'argv').read_text().splitlines() == ['-m', 'qvjax.main', *USER_ARGS]

  # A run that is still going: a second start is refused; the stop command
  # sends SIGTERM and waits for the exit.
  (tmp_path / 'wait').touch()
  assert _remote(tmp_path, start).returncode == 0
  for _ in range(100):
    if (tmp_path / 'qvjax-run.pid').exists():
      break
    time.sleep(0.05)
  again = _remote(tmp_path, start)
  assert again.returncode == 1 and 'already running' in again.stderr
  r = run(TPU_DELETE, '--dry-run', '--name=qv', '--zone=z', '--stop-only', '--grace=10')
  (stop,) = gcloud_commands(r.stdout)
  stopped = _remote(tmp_path, option(stop, 'command'))
  assert stopped.returncode == 0, stopped.stderr
  assert 'SIGTERM sent to qvjax' in stopped.stdout
  assert stopped.stdout.endswith('qvjax exited with code 0\n')
  assert 'saved at signal' in (tmp_path / 'qvjax-run.log').read_text()
  nothing = _remote(tmp_path, option(stop, 'command'))
  assert nothing.returncode == 0 and 'no qvjax run' in nothing.stdout


def _fake_gcloud(tmp_path, states):
  """A stand-in gcloud: `describe` answers NOT_FOUND until `create`, then
  each of `states` in turn; `scp` copies into the fake home; `ssh` runs the
  command there, as a worker would. Every call is logged."""
  home = tmp_path / 'home'
  home.mkdir()
  bin_ = tmp_path / 'bin'
  bin_.mkdir()
  (tmp_path / 'states').write_text(''.join(f'{s}\n' for s in states))
  _executable(bin_ / 'gcloud', f"""\
      #!/usr/bin/env bash
      printf '%s\\n' "$*" >> {tmp_path}/gcloud.log
      case "$3 $4" in
        'queued-resources describe')
          [[ -f {tmp_path}/created ]] || {{ echo 'ERROR: (gcloud) NOT_FOUND: Resource not found' >&2; exit 1; }}
          state=$(head -n 1 {tmp_path}/states); sed -i 1d {tmp_path}/states; echo "$state" ;;
        'queued-resources create') touch {tmp_path}/created ;;
        'tpu-vm scp') cp "$5" {home}/"${{6#*:}}" ;;
        'tpu-vm ssh')
          for a in "$@"; do [[ $a == --command=* ]] && command=${{a#--command=}}; done
          cd {home} && HOME={home} bash -c "$command" ;;
      esac
      """)
  return home, _env(PATH=f'{bin_}:{os.environ["PATH"]}', QVJAX_POLL_S='0', SSH_AUTH_SOCK='')


def test_tpu_pod_creates_waits_starts_and_streams(tmp_path):
  home, env = _fake_gcloud(tmp_path, ['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  venv = home / 'qvjax' / '.venv' / 'bin'
  venv.mkdir(parents=True)
  _executable(venv / 'python', """\
      #!/usr/bin/env bash
      echo "step 10: loss 3.2 ($*)"
      """)
  r = subprocess.run(['bash', str(TPU_POD), '--name=qv', '--zone=z', '--type=v4-8', '--skip-setup',
                      '--', '--config=configs/tiny.py', '--workdir=gs://b/r'],
                     env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert 'queued resource qv: ACTIVE' in r.stdout
  assert 'step 10: loss 3.2 (-m qvjax.main --config=configs/tiny.py --workdir=gs://b/r)' in r.stdout
  assert r.stdout.endswith('qvjax exited with code 0\n')
  calls = [c.split()[2:4] for c in (tmp_path / 'gcloud.log').read_text().splitlines()]
  assert calls == [['queued-resources', 'describe'], ['queued-resources', 'create'],
                   ['queued-resources', 'describe'], ['queued-resources', 'describe'],
                   ['queued-resources', 'describe'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh']]


def test_tpu_pod_stops_on_a_failed_queued_resource(tmp_path):
  _, env = _fake_gcloud(tmp_path, ['SUSPENDED'])
  r = subprocess.run(['bash', str(TPU_POD), '--name=qv', '--zone=z', '--type=v4-8',
                      '--setup-only'], env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 1
  assert 'queued resource qv is SUSPENDED' in r.stderr and 'launch/tpu_delete.sh' in r.stderr


def test_tpu_pod_copies_this_checkout(tmp_path):
  home, env = _fake_gcloud(tmp_path, [])
  # The install needs the network: a stand-in python3 records it and fails.
  _executable(tmp_path / 'bin' / 'python3', f"""\
      #!/usr/bin/env bash
      echo "$*" > {tmp_path}/python3.argv
      exit 1
      """)
  r = subprocess.run(['bash', str(TPU_POD), '--name=qv', '--zone=z', '--no-queue', '--setup-only'],
                     env=dict(env, TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=30)
  assert r.returncode == 1
  assert (tmp_path / 'python3.argv').read_text() == '-m pip install --user --quiet --upgrade uv\n'
  ssh = (tmp_path / 'gcloud.log').read_text().splitlines()[-1]
  assert 'tar -xzf qvjax-src.tar.gz -C qvjax' in ssh, r.stderr
  copied = home / 'qvjax'
  assert (copied / 'launch' / 'tpu_pod.sh').is_file()
  assert (copied / 'qvjax' / 'main.py').is_file() and (copied / 'pyproject.toml').is_file()
  assert not (copied / '.git').exists()
  assert not (tmp_path / 'qvjax-src-qv.tar.gz').exists()


# ------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_one_process_per_node():
  r = run(SLURM, *USER_ARGS, env=dict(DRY_RUN='1'))
  assert r.returncode == 0, r.stderr
  cd, step = commands(r.stdout)
  assert cd == ['cd', str(ROOT)]
  assert step == ['JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7', 'srun', '--kill-on-bad-exit=1',
                  '--ntasks-per-node=1', 'python', '-m', 'qvjax.main', *USER_ARGS]


def test_slurm_dry_run_one_process_per_gpu_and_cpus():
  env = dict(DRY_RUN='1', SLURM_NTASKS_PER_NODE='4', SLURM_CPUS_PER_TASK='12',
             PYTHON='/venv/bin/python', SLURM_SUBMIT_DIR='/tmp')
  r = run(SLURM, '--config=configs/qv_small.py', env=env)
  assert r.returncode == 0, r.stderr
  cd, step = commands(r.stdout)
  assert cd == ['cd', '/tmp']
  assert step == ['SRUN_CPUS_PER_TASK=12', 'srun', '--kill-on-bad-exit=1', '--ntasks-per-node=4',
                  '/venv/bin/python', '-m', 'qvjax.main', '--config=configs/qv_small.py']


@pytest.mark.parametrize('env,ids', [(dict(SLURM_GPUS_ON_NODE='4'), '0,1,2,3'),
                                     (dict(CUDA_VISIBLE_DEVICES='3,5'), '0,1'),
                                     (dict(QVJAX_GPUS_PER_NODE='1', SLURM_GPUS_ON_NODE='4'), '0')])
def test_slurm_gpus_per_node(env, ids):
  r = run(SLURM, '--config=c', env=dict(DRY_RUN='1', **env))
  assert r.returncode == 0, r.stderr
  assert commands(r.stdout)[1][0] == f'JAX_LOCAL_DEVICE_IDS={ids}'


def test_slurm_directives():
  directives = [l.split()[1] for l in SLURM.read_text().splitlines() if l.startswith('#SBATCH')]
  assert directives == ['--job-name=qvjax', '--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
                        '--time=24:00:00', '--signal=B:USR1@300', '--requeue',
                        '--open-mode=append', '--output=%x-%j.out']
  # sbatch stops reading directives at the first command.
  first_command = next(i for i, l in enumerate(SLURM.read_text().splitlines())
                       if l.strip() and not l.startswith('#'))
  last_directive = max(i for i, l in enumerate(SLURM.read_text().splitlines())
                       if l.startswith('#SBATCH'))
  assert last_directive < first_command


@pytest.mark.parametrize('args,env,message', [
    ([], dict(DRY_RUN='1'), 'at least --config'),
    (['--workdir=/x'], dict(DRY_RUN='1'), 'at least --config'),
    (['--config=c'], {}, 'not inside a SLURM job'),
    (['--config=c'], dict(DRY_RUN='1', QVJAX_GPUS_PER_NODE='x'), 'is invalid'),
])
def test_slurm_bad_usage_exits_2(args, env, message):
  r = run(SLURM, *args, env=env)
  assert r.returncode == 2
  assert message in r.stderr


def _fake_slurm(tmp_path, srun_body):
  bin_ = tmp_path / 'bin'
  bin_.mkdir()
  _executable(bin_ / 'srun', f"""\
      #!/usr/bin/env bash
      echo $$ > {tmp_path}/srun.pid
      printf '%s\\n' "$@" > {tmp_path}/srun.argv
      echo "$JAX_LOCAL_DEVICE_IDS" > {tmp_path}/srun.ids
      {srun_body}
      """)
  for name in ('scancel', 'scontrol'):
    _executable(bin_ / name, f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > {tmp_path}/{name}.argv
        if [[ {name} == scancel ]]; then kill -TERM "$(cat {tmp_path}/srun.pid)"; fi
        """)
  return _env(PATH=f'{bin_}:{os.environ["PATH"]}', SLURM_JOB_ID='42', SLURM_NTASKS_PER_NODE='1',
              SLURM_GPUS_ON_NODE='2', SLURM_SUBMIT_DIR=str(tmp_path))


def test_slurm_job_runs_srun_and_returns_its_exit_code(tmp_path):
  env = _fake_slurm(tmp_path, 'exit 3')
  r = subprocess.run(['bash', str(SLURM), '--config=configs/tiny.py'], env=env,
                     capture_output=True, text=True, timeout=20)
  assert r.returncode == 3, r.stderr
  assert (tmp_path / 'srun.argv').read_text().splitlines() == [
      '--kill-on-bad-exit=1', '--ntasks-per-node=1', 'python', '-m', 'qvjax.main',
      '--config=configs/tiny.py']
  assert (tmp_path / 'srun.ids').read_text() == '0,1\n'
  assert not (tmp_path / 'scontrol.argv').exists()


def test_slurm_time_limit_signal_saves_and_requeues(tmp_path):
  """SIGUSR1 (--signal=B:USR1@300) -> scancel --signal=TERM to the steps ->
  qvjax saves and exits 0 -> the job requeues itself."""
  env = _fake_slurm(tmp_path, "trap 'echo saved; exit 0' TERM; while :; do sleep 0.1; done")
  p = subprocess.Popen(['bash', str(SLURM), '--config=configs/tiny.py'], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for _ in range(200):
    if (tmp_path / 'srun.pid').exists():
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGUSR1)
  out, err = p.communicate(timeout=20)
  assert p.returncode == 0, err
  assert (tmp_path / 'scancel.argv').read_text().splitlines() == ['--signal=TERM', '42']
  assert (tmp_path / 'scontrol.argv').read_text().splitlines() == ['requeue', '42']
  assert 'saved' in out and 'requeueing job 42' in out


# ------------------------------------------------------------------------- local


@pytest.mark.parametrize('args,env', [([], {}), (['two'], {}), (['0'], {}),
                                      (['2'], dict(QVJAX_DEVICES='3'))])
def test_local_sh_bad_usage_exits_2(args, env):
  r = run(LOCAL, *args, env=env)
  assert r.returncode == 2
  if env:
    assert 'QVJAX_DEVICES=3 is invalid' in r.stderr
  else:
    assert 'Usage: launch/local.sh N' in r.stderr
