"""Entry point: `python -m qvjax.main --config=configs/qv_small.py [--workdir=DIR] [--mode=...]`.

Every host of a multi-host job runs the same command.
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


def dispatch(c, workdir: str):
  import jax  # After the flags parse, so --help and usage errors stay instant.
  from qvjax import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.distributed_timeout, FLAGS.distributed)
  config_lib.validate(c, jax.device_count(), jax.process_count(), workdir)
  if FLAGS.mode == 'eval':
    from qvjax import evaluate
    evaluate.run(c, workdir, FLAGS.step)
    return
  if FLAGS.mode == 'generate':
    from qvjax import generate
    s = c.sample
    generate.run(c, workdir, prompt=s.prompt, max_new_tokens=s.max_new_tokens,
                 temperature=s.temperature, top_k=s.top_k, seed=c.seed)
    return
  from qvjax import data, loop
  data.check_sources(c)  # A missing dataset or split fails before run.json is written.
  workdir_lib.claim(workdir, c, write=jax.process_index() == 0)
  loop.train_and_evaluate(c, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    print('error: --config is required, e.g. --config=configs/qv_small.py', file=sys.stderr)
    sys.exit(2)
  c = FLAGS.config
  # Generation flags are shorthands for config.sample.* (and config.seed), so
  # they are validated with everything else.
  for flag, key in (('prompt', 'prompt'), ('max_new_tokens', 'max_new_tokens'),
                    ('temperature', 'temperature'), ('top_k', 'top_k')):
    if FLAGS[flag].value is not None:
      c.sample[key] = FLAGS[flag].value
  if FLAGS.seed is not None:
    c.seed = FLAGS.seed
  workdir = FLAGS.workdir or os.path.join('runs', c.name)
  try:
    # Every bad knob fails here, before data, tokenizer or any compile.
    config_lib.validate_model(c.model)
    if FLAGS.mode == 'train':
      workdir_lib.claim(workdir, c, write=False)
    dispatch(c, workdir)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except config_lib.RunStopped as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def run():
  logging.set_verbosity(logging.WARNING)
  app.run(main)


if __name__ == '__main__':
  run()
