"""Workdir safety: a workdir belongs to one model. <workdir>/run.json records
what fixes a checkpoint's meaning (model, tokenizer, seq_len); a later run
with a different value there is refused instead of clobbering the old run.
"""

import json
import os
import time

from qvjax.config import ConfigError

RECORD = 'run.json'


def identity(c) -> dict:
  return {'model': c.model.to_dict(), 'tokenizer': c.tokenizer.to_dict(),
          'seq_len': c.seq_len, 'dataset': c.dataset.name}


def first_difference(old: dict, new: dict, prefix: str = ''):
  """(dotted key, old value, new value) of the first difference, or None.
  Keys the old record lacks are knobs added since: not a difference."""
  for key in sorted(set(old) | set(new)):
    if key not in old:
      continue
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      found = first_difference(a, b, f'{prefix}{key}.')
      if found:
        return found
    elif a != b:
      return f'{prefix}{key}', a, b
  return None


def claim(workdir: str, c, write: bool, fresh: bool = False) -> bool:
  """Checks (and on first use, when `write`, records) the workdir's run.
  Returns True if the workdir already held this run. With `fresh`, a workdir
  of another run is moved aside to <workdir>.old-<time> (when `write`)."""
  path = os.path.join(workdir, RECORD)
  new = identity(c)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = first_difference(old, new)
    if diff and fresh:
      if write:
        aside = f'{os.path.abspath(workdir)}.old-{time.strftime("%Y%m%d-%H%M%S")}'
        os.rename(workdir, aside)
        print(f'--fresh: moved the previous run in {workdir} to {aside}', flush=True)
        return claim(workdir, c, write)
      return False
    if diff:
      key, was, now = diff
      raise ConfigError(f'config.{key}={now!r} is invalid for workdir {workdir}: it holds a '
                        f'run with {key}={was!r}; use another --workdir, the same config, '
                        'or --fresh to move the old run aside')
    return True
  if write:
    os.makedirs(workdir, exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return False
