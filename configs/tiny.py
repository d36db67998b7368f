"""Seconds-long runs for tests: a 2-layer model on short sequences."""

from configs import default


def get_config():
  c = default.get_config()
  c.name = 'tiny'
  c.model.num_layers = 2
  c.model.emb_dim = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 8
  c.model.mlp_dim = 64
  c.model.vocab_size = 512
  c.model.qv_ka.ctx_dim = 8
  c.model.mla.kv_lora_rank = 16
  c.model.mla.qk_nope_head_dim = 8
  c.model.mla.qk_rope_head_dim = 4
  c.model.mla.v_head_dim = 8
  c.tokenizer.train_max_chars = 200_000
  c.seq_len = 32
  c.global_batch_size = 8
  c.num_train_steps = 6
  c.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.eval_batches = 2
  c.checkpoint_every_steps = 3
  c.sample.max_new_tokens = 8
  return c
