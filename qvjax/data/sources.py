"""Random-access TFDS sources, prepared once on first use.

`tfds.data_source` reads ArrayRecord files without TensorFlow and gives
grain what it needs: `len` and `__getitem__`. In a multi-host run only
process 0 prepares a missing dataset; the others wait for its
`dataset_info.json`, which TFDS writes last (it renames a finished temporary
directory into place), so its presence means the data is complete.
"""

import time

from etils import epath
import jax
import ml_collections
import tensorflow_datasets as tfds

from qvjax.data import shakespeare  # pylint: disable=unused-import  (registers the builder)

WAIT_TIMEOUT_S = 1800.0
_POLL_S = 5.0


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown dataset {name!r}: not a TFDS builder (local builders:'
        " 'shakespeare'; others: tfds.list_builders())."
    ) from e


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Writes ArrayRecord files: the only format `tfds.data_source` reads."""
  try:
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Dataset {builder.name!r} is not prepared in {builder.data_dir} and'
        f' preparing it failed: {e}'
    ) from e


def _wait_for(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  builder = _builder(name, data_dir)
  info = epath.Path(builder.data_dir) / 'dataset_info.json'
  deadline = time.monotonic() + WAIT_TIMEOUT_S
  while not info.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(
          f'Process {jax.process_index()} waited {WAIT_TIMEOUT_S:.0f}s for'
          f' process 0 to prepare {name!r} ({info} still missing).'
      )
    time.sleep(_POLL_S)
  return _builder(name, data_dir)  # Re-read: now it loads the written info.


def get_source(config: ml_collections.ConfigDict, split: str):
  """Returns a random-access source of `split` of config.dataset.name.

  Elements are dicts of numpy values (text features come back as bytes).
  `split` may carry a TFDS slice ('train[:10%]'); its base must exist.
  """
  name = config.dataset.name
  data_dir = config.dataset.data_dir or None  # None: the TFDS default dir.
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    if jax.process_index() == 0:
      _prepare(builder)
      builder = _builder(name, data_dir)
    else:
      builder = _wait_for(name, data_dir)
  splits = sorted(builder.info.splits.keys())
  if split.split('[')[0] not in splits:
    raise ValueError(
        f'Dataset {name!r} has no split {split!r}; it has {splits}.'
    )
  return builder.as_data_source(split=split)
