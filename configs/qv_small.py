"""qv_small: the shared small setup (configs/small.py) with attention=qv, num_kv_heads=4."""

from configs.small import get_small_config


def get_config():
  return get_small_config('qv_small', 'qv', num_kv_heads=4)
