"""qkv_small: the shared small setup (configs/small.py) with attention=qkv, num_kv_heads=4."""

from configs.small import get_small_config


def get_config():
  return get_small_config('qkv_small', 'qkv', num_kv_heads=4)
