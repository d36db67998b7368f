"""Checks of the dataset and tokenizer config blocks that need no I/O.

`validate_config` runs at the start of every data entry point (sources,
tokenizer) and may also run with the rest of config validation, before
anything is read, trained or compiled.
"""

import ml_collections

from qvjax.config import ConfigError

MODEL_TYPES = ('unigram', 'bpe')


def _require(ok: bool, key: str, value, valid: str) -> None:
  if not ok:
    raise ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def _int_at_least(c, key: str, low: int) -> None:
  block, name = key.split('.')
  value = c[block][name]
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
           key, value, f'must be an integer >= {low}')


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first bad dataset.* or tokenizer.* value."""
  d, t = c.dataset, c.tokenizer
  for key in ('name', 'text_key', 'train_split', 'eval_split'):
    _require(isinstance(d[key], str) and d[key].strip() != '', f'dataset.{key}',
             d[key], 'must be a non-empty string')
  _require(d.name != 'text_files' or bool(str(d.files).strip()), 'dataset.files',
           d.files, "dataset 'text_files' needs a folder, glob or"
           ' comma-separated list of .txt/.md/.jsonl files')
  _int_at_least(c, 'dataset.files_eval_every', 2)
  _int_at_least(c, 'dataset.num_workers', 0)
  _int_at_least(c, 'dataset.prefetch', 0)
  _int_at_least(c, 'dataset.read_threads', 1)
  _int_at_least(c, 'dataset.read_prefetch', 0)
  _require(t.model_type in MODEL_TYPES, 'tokenizer.model_type', t.model_type,
           f'one of {", ".join(MODEL_TYPES)}')
  _int_at_least(c, 'tokenizer.vocab_size', 0)
  _int_at_least(c, 'tokenizer.train_max_chars', 1)
  _require(t.vocab_size <= c.model.vocab_size, 'tokenizer.vocab_size', t.vocab_size,
           f'must be <= model.vocab_size={c.model.vocab_size} (0 = equal)')
