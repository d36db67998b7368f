"""Entry point: `python -m qvjax.main --config=configs/qv_small.py [--workdir=DIR]`.

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
flags.DEFINE_enum('mode', 'train', ['train'], 'train: train (resuming) and evaluate.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    print('error: --config is required, e.g. --config=configs/qv_small.py', file=sys.stderr)
    sys.exit(2)
  c = FLAGS.config
  workdir = FLAGS.workdir or os.path.join('runs', c.name)
  # Every bad knob fails here, before data, tokenizer or compile.
  try:
    import jax
    config_lib.validate(c, jax.device_count(), jax.process_count(), workdir)
    workdir_lib.claim(workdir, c, write=jax.process_index() == 0)
    from qvjax import train
    train.train_and_evaluate(c, workdir)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main)
