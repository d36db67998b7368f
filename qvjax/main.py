"""Entry point: `python -m qvjax.main --config=configs/qv_small.py [--workdir=DIR] [--mode=...]`.

Every host of a multi-host job runs the same command. Bad input fails in one
line with exit code 2: flag and config values before JAX even starts, then
what depends on the devices, all before any data, tokenizer or compile.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qvjax import config as config_lib
from qvjax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the run writes; default runs/<config.name>.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'generate'],
                  'train: train (resuming) and evaluate; eval: score a checkpoint; '
                  'generate: sample text from the latest checkpoint with a KV cache.')
flags.DEFINE_bool('fresh', False, 'train: start over in a workdir that holds another run; '
                  'the old contents are moved to <workdir>.old-<time>, never deleted.')
flags.DEFINE_integer('step', None, '--mode=eval: the checkpoint step (default: latest).')
flags.DEFINE_string('prompt', None, '--mode=generate: the text to continue '
                    '(default config.sample.prompt).')
flags.DEFINE_integer('max_new_tokens', None, '--mode=generate (default config.sample.*).')
flags.DEFINE_float('temperature', None, '--mode=generate: 0 = greedy (default config.sample.*).')
flags.DEFINE_integer('top_k', None, '--mode=generate: 0 = no top-k (default config.sample.*).')
flags.DEFINE_integer('seed', None, '--mode=generate (default config.seed).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs outside TPU pods, '
                    'SLURM and Open MPI (which are detected).')
flags.DEFINE_integer('num_processes', None, 'With --coordinator_address: how many.')
flags.DEFINE_integer('process_id', None, 'With --coordinator_address: this one, from 0.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'Join a multi-process job: auto = when the flags above are set or a '
                  'cluster (SLURM, Open MPI, Cloud TPU VM) is detected.')
flags.DEFINE_integer('distributed_timeout', 300,
                     'Seconds to wait for every process to join.')


def apply_shorthands(c):
  """Generation flags are shorthands for config.sample.* (and config.seed),
  so they are validated with everything else."""
  for key in ('prompt', 'max_new_tokens', 'temperature', 'top_k'):
    if FLAGS[key].value is not None:
      c.sample[key] = FLAGS[key].value
  if FLAGS.seed is not None:
    c.seed = FLAGS.seed


def dispatch(c, workdir: str):
  config_lib.validate_static(c, workdir)
  if FLAGS.mode == 'train':
    workdir_lib.claim(workdir, c, write=False, fresh=FLAGS.fresh)
  import jax  # Only now: the checks above run in a fraction of a second.
  from qvjax import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.distributed_timeout, FLAGS.distributed)
  config_lib.validate_for_devices(c, jax.device_count(), jax.process_count())
  if FLAGS.mode == 'eval':
    from qvjax import evaluate
    evaluate.run(c, workdir, FLAGS.step)
  elif FLAGS.mode == 'generate':
    from qvjax import generate
    s = c.sample
    generate.run(c, workdir, prompt=s.prompt, max_new_tokens=s.max_new_tokens,
                 temperature=s.temperature, top_k=s.top_k, seed=c.seed)
  else:
    from qvjax import data, loop
    data.check_sources(c)  # A missing dataset or split fails before run.json is written.
    workdir_lib.claim(workdir, c, write=jax.process_index() == 0, fresh=FLAGS.fresh)
    loop.train_and_evaluate(c, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    fail('--config is required, e.g. --config=configs/qv_small.py')
  c = FLAGS.config
  try:
    apply_shorthands(c)
    workdir = FLAGS.workdir or os.path.join('runs', str(c.name))
    dispatch(c, workdir)
  except config_lib.ConfigError as e:
    fail(str(e))
  except config_lib.RunStopped as e:
    fail(str(e), code=1)


def fail(message: str, code: int = 2):
  prefix = ''
  if 'jax' in sys.modules:
    import jax
    if jax.process_count() > 1:
      prefix = f'[process {jax.process_index()}] '
  print(f'{prefix}error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parser, with a bad flag or config override as one line, exit 2."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, (AttributeError, KeyError)):
      detail = f'unknown config key {detail.strip(chr(34) + chr(39))} (configs/default.py lists every knob)'
    print(f'error: {detail}', file=sys.stderr)
    sys.exit(2)


def run():
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
