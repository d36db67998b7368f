"""How fast the input pipeline delivers train batches on this host.

  python -m qvjax.data.bench --config=configs/qv_small.py [--batches=300]
      [--workdir=DIR] [--config.dataset.num_workers=2] ...

Builds exactly the iterator training uses (make_train_iterator, with this
host's share of the global batch) and times `next()` alone: no device
transfer, no train step. Prints tokens/s and batches/s per host; the
pipeline keeps up when this beats the train step's tokens/s per host. The
tokenizer is config.tokenizer.path, else <workdir>/tokenizer/spm.model
(trained there if missing; --workdir defaults to a temporary folder).
"""

import os
import sys
import tempfile
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from qvjax import config as config_lib
from qvjax.data import pipeline
from qvjax.data import tokenizer as tokenizer_lib

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run as a program: importing `run` defines no global flags
  (they would clash with qvjax.main's in one process)."""
  config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where the tokenizer is (or is trained); '
                      'default: a temporary folder.')
  flags.DEFINE_integer('batches', 300, 'Batches to time (after --warmup).')
  flags.DEFINE_integer('warmup', 10, 'Batches fetched before timing starts.')
  flags.DEFINE_integer('process_count', 0, 'Hosts to simulate (0: this job).')
  flags.DEFINE_integer('process_index', 0, 'This host, with --process_count.')

def run(c, workdir: str, *, batches: int, warmup: int, process_index: int,
        process_count: int) -> dict:
  global_batch = config_lib.global_batch_size(c, jax.device_count())
  local_batch = max(global_batch // process_count, 1)
  start = time.perf_counter()
  tok = tokenizer_lib.get_tokenizer(c, workdir)
  tokenizer_s = time.perf_counter() - start
  tokenizer_lib.check_vocab(c, tok)

  start = time.perf_counter()
  it = pipeline.make_train_iterator(c, tok, local_batch_size=local_batch,
                                    process_index=process_index,
                                    process_count=process_count)
  next(it)
  first_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    next(it)
  weights = 0.0
  start = time.perf_counter()
  for _ in range(batches):
    weights += float(np.sum(next(it)['weights']))
  elapsed = time.perf_counter() - start
  it.close()
  tokens = batches * local_batch * c.seq_len
  return dict(local_batch=local_batch, tokenizer=tok, tokenizer_s=tokenizer_s,
              first_batch_s=first_s, seconds=elapsed,
              batches_per_s=batches / elapsed, tokens_per_s=tokens / elapsed,
              loss_fraction=weights / tokens)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    print('error: --config is required, e.g. --config=configs/qv_small.py',
          file=sys.stderr)
    sys.exit(2)
  c = FLAGS.config
  count = FLAGS.process_count or jax.process_count()
  index = FLAGS.process_index if FLAGS.process_count else jax.process_index()
  d = c.dataset
  try:
    with tempfile.TemporaryDirectory(prefix='qvjax-bench-') as tmp:
      r = run(c, FLAGS.workdir or tmp, batches=FLAGS.batches,
              warmup=FLAGS.warmup, process_index=index, process_count=count)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  tok = r['tokenizer']
  print(f'data bench: {d.name} {d.train_split!r}, host {index} of {count}, '
        f'{r["local_batch"]} rows x {c.seq_len} tokens per batch, '
        f'num_workers={d.num_workers} prefetch={d.prefetch} '
        f'read_threads={d.read_threads}, {os.cpu_count()} CPUs')
  print(f'tokenizer: {tok.vocab_size} pieces from {tok.path} '
        f'({r["tokenizer_s"]:.1f} s to load or train); first batch after '
        f'{r["first_batch_s"]:.2f} s')
  print(f'{FLAGS.batches} batches in {r["seconds"]:.2f} s: '
        f'{r["batches_per_s"]:.1f} batches/s, {r["tokens_per_s"]:,.0f} tokens/s '
        f'per host ({r["loss_fraction"]:.2%} of them carry loss)')


if __name__ == '__main__':
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main)
