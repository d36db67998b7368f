"""Scale presets: one file per size (125m.py, 350m.py, 1b.py, 7b.py), the
attention paradigm as the config argument:

  python -m qvjax.main --config=configs/scale/125m.py:qv --workdir=runs/qv_125m
  python -m qvjax.bench --estimate --config=configs/scale/7b.py:mla

Paradigms: qkv (MHA), gqa (H/4 KV heads), mqa (1 KV head), qv, qv_gqa (QV
with H/4 heads), qv_ka, mla, mla_qv. Within a size every paradigm shares
depth, width, MLP, vocabulary and data; only the attention differs (so the
parameter count differs a little: docs/performance.md lists them).

The shapes follow GPT-3's table for 125m/350m (tied embeddings) and Llama's
for 1b/7b (untied); SwiGLU width ~8/3 D rounded to a multiple of 128; a
32768-piece vocabulary; 2048-token sequences; bfloat16 compute with float32
master weights; step counts of ~20 tokens per parameter (Chinchilla). They
expect a large dataset (C4 by default: prepare it with
`tfds build c4/en --file_format=array_record`, docs/data.md); the embedded
Shakespeare corpus is far too small for them.
"""

from configs import default

# name: (layers, emb_dim, heads, head_dim, mlp_dim, tied, global batch,
#        steps, learning rate, mesh, remat)
SIZES = {
    '125m': (12, 768, 12, 64, 2048, True, 256, 5_000, 6e-4, dict(data=-1), 'none'),
    '350m': (24, 1024, 16, 64, 2816, True, 256, 14_000, 3e-4, dict(data=-1), 'none'),
    '1b': (20, 2048, 16, 128, 5504, False, 512, 20_000, 3e-4, dict(data=1, fsdp=-1), 'dots'),
    '7b': (32, 4096, 32, 128, 11008, False, 1024, 70_000, 3e-4, dict(data=1, fsdp=-1),
           'full'),
}
# MLA per size: (kv_lora_rank r, qk_nope n, qk_rope p, v_head e, q_lora_rank)
# (DeepSeek-V2-Lite's r = 512, n = e = 128, p = 64 from 1b up).
MLA = {
    '125m': (256, 64, 32, 64, 0),
    '350m': (256, 64, 32, 64, 0),
    '1b': (512, 128, 64, 128, 0),
    '7b': (512, 128, 64, 128, 1536),
}
PARADIGMS = ('qkv', 'gqa', 'mqa', 'qv', 'qv_gqa', 'qv_ka', 'mla', 'mla_qv')


def get_scale_config(size: str, paradigm: str = 'qkv'):
  if paradigm not in PARADIGMS:
    raise ValueError(f'configs/scale/{size}.py:{paradigm}: the paradigm must be one of '
                     f'{", ".join(PARADIGMS)}')
  (layers, dim, heads, head_dim, mlp, tied, batch, steps, lr, mesh,
   remat) = SIZES[size]
  c = default.get_config()
  c.name = f'{paradigm}_{size}'
  m = c.model
  m.num_layers, m.emb_dim, m.num_heads, m.head_dim, m.mlp_dim = layers, dim, heads, head_dim, mlp
  m.vocab_size = 32_768
  m.tie_embeddings = tied
  m.dtype = 'bfloat16'
  m.attention = {'gqa': 'qkv', 'mqa': 'qkv', 'qv_gqa': 'qv'}.get(paradigm, paradigm)
  m.num_kv_heads = {'gqa': heads // 4, 'qv_gqa': heads // 4, 'mqa': 1}.get(paradigm, heads)
  m.qv_ka.ctx_dim = 64
  r, n, p, e, q = MLA[size]
  m.mla.update(kv_lora_rank=r, qk_nope_head_dim=n, qk_rope_head_dim=p, v_head_dim=e,
               q_lora_rank=q)
  c.dataset.name = 'c4/en'
  c.tokenizer.vocab_size = 32_000  # Trained pieces; the embedding is padded to 32768.
  c.tokenizer.train_max_chars = 50_000_000
  c.seq_len = 2048
  c.global_batch_size = batch
  c.num_train_steps = steps
  c.learning_rate = lr
  c.warmup_steps = 2000 if steps > 4000 else steps // 10
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.eval_batches = 32
  c.checkpoint_every_steps = 1000
  c.mesh.update(data=mesh.get('data', 1), fsdp=mesh.get('fsdp', 1), tensor=1)
  c.remat = remat
  c.loss_chunk = 512  # 2048 x 32768 float32 logits are 268 MB per sequence.
  c.sample.max_new_tokens = 64
  return c
