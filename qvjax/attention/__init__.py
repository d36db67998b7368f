"""Registry: config name (`model.attention`) -> attention module class.

'mla' and 'mla_qv' are named here so configs and errors know them, but are
not implemented yet (issue 3): asking for them fails at config validation.
"""

from qvjax.attention.qkv import QKVAttention
from qvjax.attention.qv import QVAttention
from qvjax.attention.qv_ka import QVKaAttention

PARADIGMS = {
    'qkv': QKVAttention,
    'qv': QVAttention,
    'qv_ka': QVKaAttention,
}
PLANNED = ('mla', 'mla_qv')


def make_attention(cfg, rngs):
  return PARADIGMS[cfg.attention](cfg, rngs)
