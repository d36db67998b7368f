"""Random-access TFDS sources: any text dataset prepared as ArrayRecord.

`tfds.data_source` reads ArrayRecord files without TensorFlow and gives
grain what it needs: `len` and `__getitem__`. Three kinds of dataset:

- 'shakespeare' (embedded) and 'text_files' (the user's files, see
  text_files.py) are local builders, prepared on first use: in a multi-host
  run process 0 prepares and the others wait for `dataset_info.json`, which
  TFDS writes last (it renames a finished temporary directory into place),
  so data_dir must be shared by the hosts (gs:// or a shared file system).
- Any other TFDS dataset ('lm1b', 'c4/en', 'wikipedia/20230601.en', your
  own) must be prepared beforehand with `tfds build NAME
  --file_format=array_record` (which needs TensorFlow, once; see
  docs/data.md). A dataset prepared in data_dir is readable even when its
  builder code is not importable here (TFDS reads its dataset_info.json).

Every user mistake (unknown or unprepared dataset, missing split, wrong text
key, empty split, a split too small for the hosts) raises
qvjax.config.ConfigError naming what was asked and what exists.
"""

import os
import time

from etils import epath
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from qvjax.config import ConfigError
from qvjax.data import options
from qvjax.data import shakespeare  # pylint: disable=unused-import  (registers the builder)
from qvjax.data import text_files

LOCAL_BUILDERS = ('shakespeare', text_files.NAME)
WAIT_TIMEOUT_S = 1800.0
_POLL_S = 5.0
_PREPARE_HINT = ("prepare it once with `tfds build {name} --data_dir={root}"
                 " --file_format=array_record` (needs TensorFlow:"
                 " pip install 'qvjax[prepare]'; see docs/data.md)")


def data_root(config: ml_collections.ConfigDict) -> str:
  """config.dataset.data_dir, or TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return config.dataset.data_dir or tfds.core.constants.get_default_data_dir()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0].rstrip('.: ') if text else type(e).__name__


def _configs_of(name: str) -> str:
  """'; its configs: a, b' for a registered builder with configs, else ''."""
  try:
    configs = sorted(tfds.builder_cls(name.split(':')[0].split('/')[0]).builder_configs)
  except Exception:  # pylint: disable=broad-except  (only for the message)
    return ''
  shown = ', '.join(configs[:20]) + (', ...' if len(configs) > 20 else '')
  return f'; its configs: {shown}' if configs else ''


def prepared_in(root: str, limit: int = 12) -> list[str]:
  """'name[/config]:version' of every dataset prepared under root."""
  found = []
  try:
    base = epath.Path(root)
    if base.is_dir():
      for pattern in ('*/*/dataset_info.json', '*/*/*/dataset_info.json'):
        for info in base.glob(pattern):
          *names, version = info.parent.relative_to(base).parts
          if tfds.core.Version.is_valid(version) and names[0] != 'downloads':
            found.append(f'{"/".join(names)}:{version}')
  except (OSError, ImportError):  # Listing is best effort: only for messages.
    pass
  found.sort()
  return found[:limit] + (['...'] if len(found) > limit else [])


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  name = config.dataset.name
  data_dir = config.dataset.data_dir or None  # None: the TFDS default dir.
  try:
    if name == text_files.NAME:
      d = config.dataset  # Resolved on every call: files may have changed.
      cfg = text_files.builder_config(d.files, d.text_key, d.files_eval_every)
      return text_files.TextFiles(config=cfg.name, data_dir=data_dir)
    return tfds.builder(name, data_dir=data_dir)
  except ConfigError:
    raise
  except tfds.core.registered.DatasetNotFoundError as e:
    root = data_root(config)
    raise ConfigError(
        f'config.dataset.name={name!r} is neither a TFDS builder known here nor'
        f' prepared in {root} (prepared there:'
        f' {", ".join(prepared_in(root)) or "nothing"};'
        f' local builders: {", ".join(LOCAL_BUILDERS)}); if it is a TFDS'
        f' dataset, {_PREPARE_HINT.format(name=name, root=root)}') from e
  except ImportError as e:  # gs:// needs gcsfs when TensorFlow is absent.
    raise ConfigError(f'config.dataset.data_dir={config.dataset.data_dir!r}'
                      f" needs gcsfs (pip install 'qvjax[gcs]'): {e}") from e
  except Exception as e:  # pylint: disable=broad-except  (e.g. a bad config name)
    raise ConfigError(f'config.dataset.name={name!r} is invalid:'
                      f' {_first_line(e)}{_configs_of(name)}') from e


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Writes ArrayRecord files: the only format `tfds.data_source` reads."""
  try:
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  except Exception as e:  # pylint: disable=broad-except
    cause = e  # A user mistake found while generating (text_files) wins.
    while cause is not None and not isinstance(cause, ConfigError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:
      raise ConfigError(str(cause)) from e
    raise ConfigError(
        f'config.dataset.data_dir={str(builder.data_dir_root)!r}: preparing'
        f' {builder.name!r} there failed: {_first_line(e)}') from e


def wait_until_exists(path: epath.Path, what: str, timeout_s: float, poll_s: float) -> None:
  """Polls for a file process 0 writes; TimeoutError naming `what` otherwise."""
  deadline = time.monotonic() + timeout_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(
          f'Process {jax.process_index()} waited {timeout_s:.0f}s for process 0 to {what}.')
    time.sleep(poll_s)


def _wait_for(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  builder = _builder(config)
  info = epath.Path(builder.data_dir) / 'dataset_info.json'
  wait_until_exists(info, f'prepare {builder.name!r} ({info} still missing;'
                    ' config.dataset.data_dir must be shared by all hosts)',
                    WAIT_TIMEOUT_S, _POLL_S)
  return _builder(config)  # Re-read: now it loads the written info.


def _is_prepared(builder) -> bool:
  """`builder.is_prepared()` without its warning on stderr when it is not
  (TFDS writes dataset_info.json last, so it marks a finished dataset)."""
  return (epath.Path(builder.data_dir) / 'dataset_info.json').exists()


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared builder of config.dataset.name, checked for ArrayRecord
  files and for config.dataset.text_key."""
  options.validate_config(config)
  name = config.dataset.name
  builder = _builder(config)
  if not _is_prepared(builder):
    if name.split(':')[0].split('/')[0] not in LOCAL_BUILDERS:
      root = data_root(config)
      base = name.split(':')[0].split('/')[0]
      others = [d for d in prepared_in(root, limit=100) if d.split('/')[0].split(':')[0] == base]
      found = f' (found: {", ".join(others)})' if others else ''
      raise ConfigError(
          f'config.dataset.name={name!r} is not prepared in {root}: no'
          f' {builder.data_dir}/dataset_info.json{found};'
          f' {_PREPARE_HINT.format(name=name, root=root)}')
    if jax.process_index() == 0:
      _prepare(builder)
      builder = _builder(config)
    else:
      builder = _wait_for(config)
  formats = builder.info.available_file_formats()
  if not formats & file_adapters.FileFormat.with_random_access():
    stored = ', '.join(sorted(f.value for f in formats)) or 'an unknown format'
    raise ConfigError(
        f'config.dataset.name={name!r} in {builder.data_dir} is stored as'
        f' {stored}; qvjax reads ArrayRecord: convert it once with `tfds'
        f' convert_format --dataset_version_dir={builder.data_dir}'
        " --out_file_format=array_record` (needs TensorFlow: pip install"
        " 'qvjax[prepare]') or rebuild with --file_format=array_record")
  _check_text_key(config, builder)
  return builder


def _check_text_key(config, builder) -> None:
  key, features = config.dataset.text_key, builder.info.features
  keys = sorted(features.keys())
  if key not in keys:
    raise ConfigError(
        f'config.dataset.text_key={key!r} is not a feature of'
        f' {config.dataset.name!r}; its features: {keys}')
  feature = features[key]
  dtype = np.dtype(getattr(feature, 'np_dtype', np.float32))
  if not (isinstance(feature, tfds.features.Text)
          or (dtype.kind in 'OSU' and not feature.shape)):
    raise ConfigError(
        f'config.dataset.text_key={key!r} is invalid: feature {key!r} of'
        f' {config.dataset.name!r} is {type(feature).__name__}, not text;'
        f' its features: {keys}')


def _split_key(config, split: str) -> str:
  for key in ('train_split', 'eval_split'):
    if config.dataset[key] == split:
      return f'config.dataset.{key}={split!r}'
  return f'split {split!r}'


def get_source(config: ml_collections.ConfigDict, split: str, *,
               process_index: int = 0, process_count: int = 1):
  """A random-access source of this host's share of `split`.

  `split` is any TFDS split string: 'train', 'train[:10%]', 'train[5:]',
  'train+validation'. With process_count > 1 the host gets
  `tfds.split_for_jax_process(split, process_index=, process_count=)`:
  a contiguous block, the blocks disjoint and covering the split, their
  sizes differing by at most one (per part of a '+' split: TFDS divides
  each part on its own). Elements are dicts of numpy values (text
  features come back as bytes).
  """
  builder = get_builder(config)
  name, asked = config.dataset.name, _split_key(config, split)
  splits = ', '.join(f'{k} ({v.num_examples})'
                     for k, v in sorted(builder.info.splits.items()))
  try:
    size = builder.info.splits[split].num_examples
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises several kinds)
    raise ConfigError(f'{asked} is invalid for {name!r}: {_first_line(e)};'
                      f' its splits: {splits}') from e
  if size == 0:
    raise ConfigError(f'{asked} of {name!r} is empty; its splits: {splits}')
  if size < process_count:
    raise ConfigError(f'{asked} of {name!r} has {size} examples, fewer than'
                      f' the {process_count} processes that share it')
  if process_count > 1:
    split = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count)
  return builder.as_data_source(split=split)


def check_sources(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError now if the train or eval split cannot be read (a
  local builder is prepared on the way): for start-up, before a workdir is
  written."""
  for split in (config.dataset.train_split, config.dataset.eval_split):
    get_source(config, split)
