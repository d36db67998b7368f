"""mla_small: the shared small setup (configs/small.py) with attention=mla
(DeepSeek-V2 latent attention; dimensions in default.py's model.mla)."""

from configs.small import get_small_config


def get_config():
  return get_small_config('mla_small', 'mla')
