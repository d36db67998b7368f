"""mla_qv_small: the shared small setup (configs/small.py) with attention=mla_qv
(MLA without W_UK; dimensions in default.py's model.mla)."""

from configs.small import get_small_config


def get_config():
  return get_small_config('mla_qv_small', 'mla_qv')
