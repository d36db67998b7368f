"""Registry: config name (`model.attention`) -> attention module class."""

from qvjax import config

from qvjax.attention.mla import MLAttention
from qvjax.attention.mla_qv import MLAQVAttention
from qvjax.attention.qkv import QKVAttention
from qvjax.attention.qv import QVAttention
from qvjax.attention.qv_ka import QVKaAttention

PARADIGMS = {
    'qkv': QKVAttention,
    'qv': QVAttention,
    'qv_ka': QVKaAttention,
    'mla': MLAttention,
    'mla_qv': MLAQVAttention,
}
MLA_PARADIGMS = config.MLA_PARADIGMS
assert tuple(PARADIGMS) == config.PARADIGMS, 'qvjax.config.PARADIGMS names what is here'


def make_attention(cfg, rngs):
  return PARADIGMS[cfg.attention](cfg, rngs)
