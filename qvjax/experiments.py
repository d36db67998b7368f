"""Run a suite of experiments: every run of configs/experiments/SUITE.py at one
scale, for several seeds, then a results table and loss curves.

    python -m qvjax.experiments --suite=paper --scale=small --seeds=2 --workdir=runs/paper_small
    python -m qvjax.experiments --suite=paper --scale=small --dry-run     # what would run

Each (run, seed) cell trains in its own workdir, DIR/<run>/seed<k>, as a
subprocess running exactly `python -m qvjax.main --config=SUITE.py:SCALE,RUN,K
--workdir=DIR/<run>/seed<k>`: the command a user would type to rerun that
cell by hand. So every cell gets qvjax.main's behaviour for free: resuming
from the latest checkpoint, refusing a workdir of another model (exit 2),
saving and exiting on SIGTERM/SIGINT. A subprocess per cell (not a function
call in this process) also means a crash or a non-finite stop in one run
cannot take the others down, each run starts with fresh device memory and
compile caches, and a cell can be launched by any launcher that takes
qvjax.main's flags (--launcher): launch/local.sh, srun, launch/tpu_pod.sh.

Cells run seed-major (every run of seed 0, then of seed 1...), so an
interrupted suite has whole seeds first. Finished cells (the final
checkpoint and the final evaluation are in the workdir) are skipped without
starting a process; partial ones resume; so running the same command again
continues where it stopped. Every cell of a suite gets the same tokenizer:
trained once into DIR/tokenizer and copied into each workdir before it
first runs (so each workdir stays self-contained, e.g. for --mode=generate
and qvjax.inspect).

At the end (and with --report-only) DIR/results.csv, DIR/results.md and
DIR/loss_curves.png are written from whatever cells have finished
(qvjax.results). Per-cell output goes to DIR/logs/<run>_seed<k>.log.

Across hosts (docs/results.md): --shard=I/N runs every N-th cell, I-th
first (a SLURM array or N machines sharing DIR), then --report-only anywhere;
or --launcher runs every cell as a multi-host job.

Exit codes: 0 every selected cell finished; 1 some cell failed; 2 bad
usage or config; 3 stopped (a signal) before the end: run the same command
again to resume.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES_DIR = os.path.join('configs', 'experiments')


class UsageError(Exception):
  pass


@dataclasses.dataclass
class Cell:
  """One (run, seed) of the suite: its config, workdir and command."""
  run: dict  # The suite's RUNS entry.
  seed: int
  config: object  # ml_collections.ConfigDict, --set overrides applied.
  workdir: str
  config_flag: str  # --config=SUITE.py:SCALE,RUN,SEED

  @property
  def name(self) -> str:
    return self.run['name']

  @property
  def key(self) -> str:
    return f'{self.name}_seed{self.seed}'


# --- The suite --------------------------------------------------------------


def load_suite(suite: str):
  """(module, path for --config): a name under configs/experiments/ or a .py path."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # Suites import configs.default and friends.
  if suite.endswith('.py'):
    path = os.path.abspath(suite)
    if not os.path.exists(path):
      raise UsageError(f'--suite={suite} is invalid: no such file')
    spec = importlib.util.spec_from_file_location(f'qvjax_suite_{os.getpid()}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    path = os.path.join(ROOT, SUITES_DIR, f'{suite}.py')
    if not os.path.exists(path):
      names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, SUITES_DIR))
                     if f.endswith('.py') and not f.startswith('_'))
      raise UsageError(f'--suite={suite} is invalid: one of {", ".join(names)} '
                       'or a path to a .py file')
    module = importlib.import_module(f'configs.experiments.{suite}')
  for attr in ('SCALES', 'RUNS', 'baseline', 'get_config'):
    if not hasattr(module, attr):
      raise UsageError(f'--suite={suite} is invalid: it defines no {attr} '
                       '(see configs/experiments/paper.py)')
  rel = os.path.relpath(path, ROOT)
  return module, (path if rel.startswith('..') else rel)


def parse_value(text: str, old):
  """A --set value, typed like the value it replaces."""
  if isinstance(old, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'expected true or false, got {text!r}')
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  return text


def apply_sets(c, sets: list[str]):
  for item in sets:
    key, sep, text = item.partition('=')
    if not sep:
      raise UsageError(f'--set {item} is invalid: expected KEY=VALUE, e.g. dataset.data_dir=/data')
    section = c
    *parents, leaf = key.split('.')
    try:
      for p in parents:
        section = section[p]
      section[leaf] = parse_value(text, section[leaf])
    except (KeyError, AttributeError, ValueError, TypeError) as e:
      raise UsageError(f'--set {item} is invalid: {e}') from None


def make_cells(suite, suite_path: str, scale: str, seeds: int, workdir: str, only, sets):
  if scale not in suite.SCALES:
    raise UsageError(f'--scale={scale} is invalid: one of {", ".join(suite.SCALES)}')
  names = [r['name'] for r in suite.RUNS]
  runs = suite.RUNS
  if only:
    unknown = [n for n in only if n not in names]
    if unknown:
      raise UsageError(f'--only={",".join(only)} is invalid: {", ".join(unknown)} not in '
                       f'the suite ({", ".join(names)})')
    runs = [r for r in runs if r['name'] in only]
  cells = []
  for seed in range(seeds):
    for run in runs:
      arg = f'{scale},{run["name"]},{seed}'
      c = suite.get_config(arg)
      apply_sets(c, sets)
      wd = os.path.join(workdir, run['name'], f'seed{seed}')
      cells.append(Cell(run, seed, c, wd, f'--config={suite_path}:{arg}'))
  return cells


# --- State of a workdir -----------------------------------------------------


def _path(p):
  from etils import epath  # gs:// workdirs too (as qvjax.main's Orbax writes them).
  return epath.Path(p)


def checkpoint_steps(workdir: str) -> list[int]:
  d = _path(workdir) / 'checkpoints'
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def read_metrics(workdir: str) -> list[dict]:
  path = _path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # A line cut by a kill.
  return rows


def status(cell: Cell) -> tuple[str, int]:
  """('finished' | 'partial' | 'new' | 'conflict: ...', latest checkpoint step)."""
  from qvjax import workdir as workdir_lib
  from qvjax.config import ConfigError
  steps = checkpoint_steps(cell.workdir)
  latest = steps[-1] if steps else 0
  n = cell.config.num_train_steps
  if not cell.workdir.startswith('gs://'):
    try:
      workdir_lib.claim(cell.workdir, cell.config, write=False)
    except ConfigError as e:
      return f'conflict: {e}', latest
  if n in steps and any(r.get('step') == n and 'eval_loss' in r
                        for r in read_metrics(cell.workdir)):
    return 'finished', latest
  if steps:
    return 'partial', latest
  return 'new', 0


def seeds_present(workdir: str, runs) -> int:
  """1 + the highest seed index with a workdir under DIR/<run>/ (0 if none)."""
  found = 0
  for run in runs:
    d = _path(workdir) / run['name']
    if d.exists():
      for p in d.iterdir():
        if p.name.startswith('seed') and p.name[4:].isdigit():
          found = max(found, int(p.name[4:]) + 1)
  return found


# --- Running ----------------------------------------------------------------


class Stopper:
  """SIGTERM/SIGINT/SIGHUP: pass a SIGTERM to the running cell (it saves and
  exits) and start no other."""

  def __init__(self):
    self.requested, self.proc = False, None
    self._previous = {s: signal.signal(s, self._handle)
                      for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

  def _handle(self, signum, frame):
    self.requested = True
    print(f'\nsignal {signum}: stopping the running cell at its next step (it saves); '
          'run the same command again to resume', flush=True)
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)

  def close(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def share_tokenizer(cells: list[Cell], workdir: str):
  """Trains the suite's tokenizer once (DIR/tokenizer/spm.model) and copies it
  into each workdir that has none. Cells with their own tokenizer.path, or
  whose tokenizer settings differ from the first cell's, are left alone."""
  from qvjax import data
  todo = [c for c in cells if not c.config.tokenizer.path]
  if not todo:
    return
  key = lambda c: json.dumps([c.config.dataset.to_dict(), c.config.tokenizer.to_dict(),
                              c.config.model.vocab_size], sort_keys=True)
  todo = [c for c in todo if key(c) == key(todo[0])]
  missing = [c for c in todo if not (_path(c.workdir) / 'tokenizer' / 'spm.model').exists()]
  if not missing:
    return
  shared = _path(workdir) / 'tokenizer' / 'spm.model'
  if not shared.exists():
    start = time.perf_counter()
    print(f'Training the suite tokenizer into {shared} ...', flush=True)
    data.check_sources(todo[0].config)
    data.get_tokenizer(todo[0].config, workdir)  # Writes DIR/tokenizer/spm.model.
    print(f'  done in {time.perf_counter() - start:.0f} s', flush=True)
  blob = shared.read_bytes()
  for c in missing:
    dst = _path(c.workdir) / 'tokenizer' / 'spm.model'
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f'.spm.model.tmp-{os.getpid()}'
    tmp.write_bytes(blob)
    tmp.rename(dst)


def command(cell: Cell, launcher: list[str], sets: list[str]) -> list[str]:
  return [*launcher, cell.config_flag, f'--workdir={cell.workdir}',
          *(f'--config.{s}' for s in sets)]


RUNNING = '.suite_running'  # In a cell's workdir while this host runs it: {host, pid}.


def running_elsewhere(cell: Cell) -> str | None:
  """'pid N' if a live process of this host already trains the cell (an
  earlier runner killed hard leaves its cell running on): two trainers must
  never share a workdir."""
  path = _path(cell.workdir) / RUNNING
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    if record['host'] != socket.gethostname():
      return None  # Another host's: --shard keeps hosts apart; a stale file is harmless.
    with open(f'/proc/{int(record["pid"])}/cmdline', 'rb') as f:
      alive = b'qvjax' in f.read()
  except (OSError, ValueError, KeyError):
    return None
  return f'pid {record["pid"]}' if alive else None


def run_cell(cell: Cell, cmd: list[str], log_path: str, stopper: Stopper) -> tuple[int, float]:
  """Runs one cell to its end (or a signal); (exit code, seconds)."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  _path(cell.workdir).mkdir(parents=True, exist_ok=True)
  marker = _path(cell.workdir) / RUNNING
  start = time.perf_counter()
  with open(log_path, 'a') as log:
    log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
    log.flush()
    # Its own session: a Ctrl-C reaches it once, from the Stopper, as SIGTERM.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    stopper.proc = proc
    marker.write_text(json.dumps({'host': socket.gethostname(), 'pid': proc.pid}))
    try:
      rc = proc.wait()
    finally:
      stopper.proc = None
      if proc.poll() is not None:
        marker.unlink(missing_ok=True)
  return rc, time.perf_counter() - start


def tail(path: str, lines: int = 15) -> str:
  try:
    with open(path) as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


def append_log(workdir: str, record: dict):
  """DIR/suite_log.jsonl: one line per cell invocation (wall time, exit code)."""
  path = _path(workdir) / 'suite_log.jsonl'
  old = path.read_text() if path.exists() else ''
  path.write_text(old + json.dumps(record) + '\n')


def describe_cell(cell: Cell) -> str:
  m = cell.config.model
  kv = '' if m.attention in ('mla', 'mla_qv') else f' G={m.num_kv_heads}'
  ctx = f' ctx={m.qv_ka.ctx_dim}' if m.attention == 'qv_ka' else ''
  return f'{m.attention}{kv}{ctx} {m.position}'


def dry_run(cells: list[Cell], cmds: dict, facts: dict):
  print(f'{"#":>3} {"run":<10} {"seed":>4}  {"status":<14} {"model":<24} {"params":>9} '
        f'{"cache B/tok":>11}  command')
  for i, cell in enumerate(cells, 1):
    state, step = status(cell)
    state = f'{state} @{step}' if state == 'partial' else state.split(':')[0]
    f = facts[cell.name]
    print(f'{i:>3} {cell.name:<10} {cell.seed:>4}  {state:<14} {describe_cell(cell):<24} '
          f'{f["params_total"] / 1e6:>8.2f}M {f["cache_bytes_per_token"]:>11}  '
          f'{shlex.join(cmds[cell.key])}')


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m qvjax.experiments', description=__doc__.split(
      '\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--suite', default='paper',
                 help='a suite under configs/experiments/ (paper) or a path to a .py file')
  p.add_argument('--scale', default='small', help="the suite's scale (paper: tiny, small, "
                 'medium, large)')
  p.add_argument('--seeds', type=int, default=None,
                 help="seed indices 0..N-1 (default: the scale's, or as many as the "
                 'suite directory already holds if more)')
  p.add_argument('--workdir', default=None, help='the suite directory (default runs/SUITE_SCALE)')
  p.add_argument('--only', default='', help='comma-separated run names: just these runs')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a config override for every cell (passed as --config.KEY=VALUE), '
                 'e.g. --set dataset.data_dir=/data/tfds; repeatable')
  p.add_argument('--shard', default='0/1', metavar='I/N',
                 help='run only cells I, I+N, I+2N, ... (0-based), e.g. one host of N')
  p.add_argument('--launcher', default=None,
                 help='command that takes qvjax.main flags (default: this python -m '
                 "qvjax.main), e.g. 'launch/local.sh 2' or 'srun python -m qvjax.main'")
  p.add_argument('--dry-run', action='store_true',
                 help='list the cells, their state and commands; run nothing')
  p.add_argument('--report-only', action='store_true',
                 help='write results.* from the finished cells; run nothing')
  args = p.parse_args(argv)
  try:
    i, n = (int(x) for x in args.shard.split('/'))
    assert 0 <= i < n
  except (ValueError, AssertionError):
    p.error(f'--shard={args.shard} is invalid: expected I/N with 0 <= I < N')
  args.shard = (i, n)
  if args.seeds is not None and args.seeds < 1:
    p.error(f'--seeds={args.seeds} is invalid: must be >= 1')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    suite, suite_path = load_suite(args.suite)
    if args.scale not in suite.SCALES:
      raise UsageError(f'--scale={args.scale} is invalid: one of {", ".join(suite.SCALES)}')
    suite_name = os.path.splitext(os.path.basename(args.suite))[0]
    workdir = args.workdir or os.path.join('runs', f'{suite_name}_{args.scale}')
    if not workdir.startswith('gs://'):
      workdir = os.path.abspath(workdir)  # Cells run with the repository as cwd.
    # Default: the scale's seed count, or as many as the directory already has.
    seeds = args.seeds or max(suite.SCALES[args.scale].get('seeds', 1),
                              seeds_present(workdir, suite.RUNS))
    only = [n for n in args.only.split(',') if n]
    cells = make_cells(suite, suite_path, args.scale, seeds, workdir, only, args.set)
    from qvjax import config as config_lib
    for cell in cells:
      config_lib.validate_static(cell.config)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Exception as e:  # ConfigError from validation, ValueError from a suite.
    print(f'error: {e}', file=sys.stderr)
    return 2
  from qvjax import results
  launcher = shlex.split(args.launcher) if args.launcher else [sys.executable, '-m', 'qvjax.main']
  cmds = {c.key: command(c, launcher, args.set) for c in cells}
  facts = {c.name: results.model_facts(c.config) for c in cells}
  meta = {'suite': suite_name, 'scale': args.scale, 'seeds': seeds, 'workdir': workdir,
          'command': shlex.join(['python', '-m', 'qvjax.experiments', *(
              sys.argv[1:] if argv is None else argv)])}
  i, n = args.shard
  mine = cells[i::n]
  if args.dry_run:
    print(f'suite {suite_name}, scale {args.scale} ({suite.SCALES[args.scale].get("about", "")}): '
          f'{len(cells) // seeds} runs x {seeds} seeds in {workdir}'
          + (f'; shard {i}/{n}: {len(mine)} cells' if n > 1 else ''))
    dry_run(mine, cmds, facts)
    return 0
  if args.report_only:
    paths = results.write(suite, cells, facts, meta)
    print('\n'.join(paths))
    return 0

  states = {c.key: status(c) for c in mine}
  counts = {}
  for s, _ in states.values():
    counts[s.split(':')[0]] = counts.get(s.split(':')[0], 0) + 1
  print(f'suite {suite_name}, scale {args.scale}: {len(mine)} cells in {workdir} '
        f'({", ".join(f"{v} {k}" for k, v in sorted(counts.items()))})', flush=True)
  stopper = Stopper()
  failed = []
  try:
    if any(s != 'finished' for s, _ in states.values()):
      share_tokenizer([c for c in mine if states[c.key][0] != 'finished'], workdir)
    for k, cell in enumerate(mine, 1):
      if stopper.requested:
        break
      state, step = status(cell)
      head = f'[{k}/{len(mine)}] {cell.name} seed {cell.seed} ({describe_cell(cell)})'
      if state == 'finished':
        print(f'{head}: finished, skipped', flush=True)
        continue
      if state.startswith('conflict'):
        print(f'{head}: FAILED, {state}', flush=True)
        failed.append(cell)
        continue
      busy = running_elsewhere(cell)
      if busy:
        print(f'{head}: FAILED, already being trained by {busy} (an earlier runner\'s '
              'cell?); stop it or wait for it, then run again', flush=True)
        failed.append(cell)
        continue
      log_path = os.path.join(results.local_dir(workdir), 'logs', f'{cell.key}.log')
      print(f'{head}: ' + (f'resuming from step {step}' if state == 'partial' else 'starting')
            + f' (log: {log_path})', flush=True)
      rc, wall = run_cell(cell, cmds[cell.key], log_path, stopper)
      append_log(workdir, {'cell': cell.key, 'run': cell.name, 'seed': cell.seed, 'rc': rc,
                           'wall_s': round(wall, 1), 'from_step': step,
                           'time': time.strftime('%Y-%m-%d %H:%M:%S')})
      state, step = status(cell)
      if state == 'finished':
        final = results.final_eval(cell)
        print(f'    finished in {wall:.0f} s: eval loss {final["eval_loss"]:.4f}, '
              f'perplexity {final["eval_perplexity"]:.2f}', flush=True)
      elif rc == 0 and stopper.requested:
        print(f'    stopped at step {step} after {wall:.0f} s', flush=True)
      else:
        print(f'    FAILED (exit code {rc}) after {wall:.0f} s; the end of {log_path}:\n'
              + tail(log_path), flush=True)
        failed.append(cell)
  finally:
    stopper.close()
    paths = results.write(suite, cells, facts, meta)
    print('Results: ' + ', '.join(paths), flush=True)
  if failed:
    print(f'{len(failed)} cell(s) failed: {", ".join(c.key for c in failed)}', file=sys.stderr)
    return 1
  if stopper.requested:
    return 3
  return 0


if __name__ == '__main__':
  sys.exit(main())
