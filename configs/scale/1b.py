"""~1b parameters; the paradigm is the config argument, e.g.
--config=configs/scale/1b.py:qv (default qkv). See configs/scale/common.py."""

from configs.scale.common import get_scale_config


def get_config(paradigm: str = 'qkv'):
  return get_scale_config('1b', paradigm)
