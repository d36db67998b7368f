"""Entry point: `python -m qvjax.main --config=configs/qv_small.py [--workdir=DIR]`.

Every host of a multi-host job runs the same command.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qvjax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the run writes; default runs/<config.name>.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to do.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    print('error: --config is required, e.g. --config=configs/qv_small.py', file=sys.stderr)
    sys.exit(2)
  c = FLAGS.config
  workdir = FLAGS.workdir or os.path.join('runs', c.name)
  # Fail on a bad knob in well under a second, before JAX starts.
  try:
    config_lib.validate_model(c.model)
    import jax  # Deferred so that bad configs fail fast.
    config_lib.validate(c, jax.device_count(), jax.process_count(), workdir)
    from qvjax import train
    os.makedirs(workdir, exist_ok=True)
    train.train_and_evaluate(c, workdir)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main)
