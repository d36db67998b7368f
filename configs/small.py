"""The shared *_small setup: ~3.7M parameters, trains on the embedded
Shakespeare corpus on a 2-core CPU in under 15 minutes. Named setups change
only the attention paradigm, so their results compare fairly."""

from configs import default


def get_small_config(name: str, attention: str, num_kv_heads: int = 4):
  c = default.get_config()
  c.name = name
  c.model.attention = attention
  c.model.num_kv_heads = num_kv_heads
  return c
