"""A user's own text as a local TFDS builder: `config.dataset.name='text_files'`.

`config.dataset.files` names the text: a folder (every .txt/.md/.jsonl file
below it), a glob ('corpus/**/*.md') or a comma-separated list of either,
local or gs://. A .txt or .md file is one document; a .jsonl file is one
document per non-blank line, the line's `config.dataset.text_key` field (or
the line itself when it is a JSON string). Blank documents are skipped.

Documents are numbered in sorted file order (lines in file order); document
i goes to 'validation' iff i % eval_every == eval_every - 1, and when there
are fewer than eval_every documents the last one does: both splits are
never empty once there are two documents.

The prepared copy lives in <data_dir>/text_files/<config>/1.0.0, where the
config name hashes the resolved file list (path, size, mtime), the text key
and eval_every: editing, adding or removing a file prepares a fresh copy
instead of silently reusing a stale one.
"""

import dataclasses
import fnmatch
import hashlib
import json
import os
from typing import Iterator

from etils import epath
import tensorflow_datasets as tfds

from qvjax.config import ConfigError

NAME = 'text_files'
EXTENSIONS = ('.txt', '.md', '.jsonl')
_WILDCARDS = '*?['


def _has_wildcard(part: str) -> bool:
  return any(c in part for c in _WILDCARDS)


def _walk(root: epath.Path):
  """Every file below root (local or gs://)."""
  for folder, _, names in root.walk():
    for name in names:
      yield epath.Path(folder) / name


def _match(parts: list[str], pattern: list[str]) -> bool:
  """fnmatch over path segments, with '**' matching any number of them."""
  if not pattern:
    return not parts
  if pattern[0] == '**':
    return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
  return (bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0])
          and _match(parts[1:], pattern[1:]))


def _glob(pattern: str) -> list[epath.Path]:
  """Files matching one folder or glob pattern (local or gs://)."""
  path = epath.Path(pattern)
  if not _has_wildcard(pattern):
    if path.is_dir():
      return [p for p in _walk(path) if p.suffix in EXTENSIONS]
    return [path] if path.exists() else []
  # Split into the longest wildcard-free folder and the pattern below it.
  parts = pattern.rstrip('/').split('/')
  first = next(i for i, part in enumerate(parts) if _has_wildcard(part))
  root = epath.Path('/'.join(parts[:first]) or ('/' if pattern.startswith('/') else '.'))
  below = parts[first:]
  if '**' not in below:  # epath's glob: one level per segment, also on gs://.
    return [p for p in root.glob('/'.join(below)) if not p.is_dir()]
  return [p for p in _walk(root) if _match(list(p.relative_to(root).parts), below)]


def resolve(files: str) -> list[epath.Path]:
  """The sorted, de-duplicated files of config.dataset.files."""
  patterns = [p.strip() for p in files.split(',') if p.strip()]
  if not patterns:
    raise ConfigError(
        "config.dataset.files='' is invalid: dataset 'text_files' needs a"
        ' folder, glob or comma-separated list of .txt/.md/.jsonl files')
  found = {}
  try:
    for pattern in patterns:
      for path in _glob(os.path.expanduser(pattern)):
        found[os.fspath(path)] = path
  except ImportError as e:  # gs:// without gcsfs (and without TensorFlow).
    raise ConfigError(f'config.dataset.files={files!r} needs gcsfs to read'
                      f" gs:// (pip install 'qvjax[gcs]'): {e}") from e
  paths = [found[k] for k in sorted(found)]
  if not paths:
    raise ConfigError(f'config.dataset.files={files!r} matches no files')
  wrong = sorted({p.suffix or p.name for p in paths if p.suffix not in EXTENSIONS})
  if wrong:
    raise ConfigError(
        f'config.dataset.files={files!r} matches files of unsupported types'
        f' {wrong}; text_files reads {", ".join(EXTENSIONS)}')
  return paths


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """Which files, the text field name, and the validation stride."""

  files: tuple[str, ...] = ()
  pattern: str = ''
  text_key: str = 'text'
  eval_every: int = 20


_CONFIGS: dict[str, TextFilesConfig] = {}  # By name, for TextFiles(config=name).


def builder_config(files: str, text_key: str, eval_every: int) -> TextFilesConfig:
  """Resolves the files; the config name fingerprints them (see module doc).

  The config is also registered by name, so that `TextFiles(config=name)`
  finds it like a predefined config (a config object would make TFDS log a
  'custom data configuration' warning on every use).
  """
  if not isinstance(eval_every, int) or eval_every < 2:
    raise ConfigError(f'config.dataset.files_eval_every={eval_every!r} is'
                      ' invalid: must be an integer >= 2')
  if text_key == 'source':
    raise ConfigError("config.dataset.text_key='source' is invalid for"
                      " text_files: 'source' names each document's file")
  paths = resolve(files)
  digest = hashlib.sha256(f'{text_key}\0{eval_every}'.encode())
  sizes = []
  for path in paths:
    stat = path.stat()
    sizes.append(stat.length)
    digest.update(f'\0{os.fspath(path)}\0{stat.length}\0{stat.mtime}'.encode())
  if not any(sizes):
    raise ConfigError(f'config.dataset.files={files!r} matches {len(paths)}'
                      ' files, all of them empty')
  config = TextFilesConfig(
      name=f'files-{digest.hexdigest()[:16]}',
      description=f'{len(paths)} files from {files!r}',
      files=tuple(os.fspath(p) for p in paths), pattern=files,
      text_key=text_key, eval_every=eval_every)
  _CONFIGS[config.name] = config
  return config


def documents(config: TextFilesConfig) -> Iterator[tuple[str, str]]:
  """Yields (source, text) of every non-blank document, in order."""
  for name in config.files:
    path = epath.Path(name)
    if path.suffix != '.jsonl':
      # Undecodable bytes become U+FFFD instead of failing a whole corpus.
      text = path.read_bytes().decode('utf-8', errors='replace')
      if text.strip():
        yield name, text
      continue
    with path.open('rb') as f:  # Streamed: .jsonl files can be large.
      for number, raw in enumerate(f, 1):
        text = _jsonl_text(raw, f'{name}:{number}', config.text_key)
        if text is not None and text.strip():
          yield f'{name}:{number}', text


def _jsonl_text(raw: bytes, where: str, text_key: str) -> str | None:
  line = raw.decode('utf-8', errors='replace')
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{where} is not valid JSON ({e.msg}); text_files'
                      ' reads one JSON object per .jsonl line') from e
  if isinstance(record, dict):
    if text_key not in record:
      raise ConfigError(
          f'config.dataset.text_key={text_key!r} is not a field of {where};'
          f' its fields: {sorted(record)}')
    record = record[text_key]
  if not isinstance(record, str):
    raise ConfigError(f'{where}: the text must be a JSON string, got'
                      f' {type(record).__name__}')
  return record


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """A user's .txt/.md/.jsonl files, one example per document."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Documents of local or gs:// text files.'}
  # TFDS 4.9.10 derives this through `importlib_resources`, a package it only
  # requires on Python < 3.9; giving it directly avoids that import.
  code_path = epath.Path(__file__)

  @classmethod
  def get_builder_config(cls, name, version=None):
    del version  # One version.
    return _CONFIGS.get(name)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            self.builder_config.text_key: tfds.features.Text(),
            'source': tfds.features.Text(),  # 'file' or 'file.jsonl:line'
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local (or on gs://, read directly).
    return {
        'train': self._generate_examples(validation=False),
        'validation': self._generate_examples(validation=True),
    }

  def _generate_examples(self, validation: bool):
    cfg = self.builder_config
    every = cfg.eval_every
    previous, count = None, 0
    # One document of lookahead: the last one is held out when there are
    # fewer than `every`, which only the end of the stream reveals.
    for index, doc in enumerate(documents(cfg)):
      if previous is not None and ((index - 1) % every == every - 1) == validation:
        yield index - 1, self._example(*previous)
      previous, count = doc, index + 1
    if count == 0:
      raise ConfigError(f'config.dataset.files={cfg.pattern!r}: all'
                        f' {len(cfg.files)} files are blank')
    if count == 1:
      raise ConfigError(
          f'config.dataset.files={cfg.pattern!r} gives 1 document; text_files'
          ' needs at least 2 (one is held out for validation)')
    last = count - 1
    held_out = last % every == every - 1 or count < every
    if held_out == validation:
      yield last, self._example(*previous)

  def _example(self, source: str, text: str) -> dict:
    return {self.builder_config.text_key: text, 'source': source}
