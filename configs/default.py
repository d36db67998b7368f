"""Every knob qvjax has, with its default. Named setups override a few of them.

Override any key from the command line: `--config.model.attention=qv`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'default'  # Names the default workdir: runs/<name>.
  c.seed = 0  # Parameter init, data shuffling and sampling all derive from it.

  m = c.model = ml_collections.ConfigDict()
  # qkv | qv | qv_ka | mla | mla_qv  (qvjax.attention.PARADIGMS).
  m.attention = 'qkv'
  m.num_layers = 4
  m.emb_dim = 256
  m.num_heads = 4
  # Key/value heads: = num_heads is MHA, 1 is MQA, a divisor in between is GQA.
  m.num_kv_heads = 4
  m.head_dim = 64
  m.mlp_dim = 768  # Hidden width of the SwiGLU MLP.
  # Embedding rows: >= the tokenizer's pieces (checked at start-up); best a
  # multiple of 128 and of mesh.tensor. Ids past the tokenizer are never sampled.
  m.vocab_size = 2048
  # rope | alibi | agf | sinusoidal | none: formulas in docs/attention.md.
  m.position = 'rope'
  m.rope_theta = 10_000.0
  m.tie_embeddings = True  # Output head = embedding matrix transposed.
  m.norm_eps = 1e-6
  m.init_std = 0.02
  # Activations/matmuls (float32 | bfloat16); parameters stay float32.
  m.dtype = 'float32'
  m.qv_ka = ml_collections.ConfigDict()
  # Per-KV-head width of the context vector G = x W_ctx; 0 gives K = V W_K.
  m.qv_ka.ctx_dim = 64
  # agf: bias -alpha_h * log(1 + distance), alpha_h = softplus(learned) >= 0;
  # heads start log-spaced from init_max down to init_min.
  m.agf = ml_collections.ConfigDict()
  m.agf.init_max = 2.0
  m.agf.init_min = 0.125
  # mla / mla_qv (DeepSeek-V2 latent attention; head_dim and num_kv_heads
  # are unused there). The defaults give the *_small setups about qkv's
  # attention parameter count with a cache of r + p = 160 numbers per token
  # and layer (qkv: 2 * 4 * 64 = 512).
  m.mla = ml_collections.ConfigDict()
  m.mla.q_lora_rank = 0  # 0 = a plain W_Q; > 0 = W_DQ, RMSNorm, W_UQ.
  m.mla.kv_lora_rank = 128  # r: width of the cached latent c.
  m.mla.qk_nope_head_dim = 64  # n: per-head content query/key width (= v for mla_qv).
  m.mla.qk_rope_head_dim = 32  # p: decoupled rope query/key width, key shared by heads.
  m.mla.v_head_dim = 64  # e: per-head value width.

  # Data: see docs/data.md. Every split key takes any TFDS split string
  # ('train', 'train[:90%]', 'train[10:]', 'train+validation').
  d = c.dataset = ml_collections.ConfigDict()
  # A TFDS dataset prepared as ArrayRecord ('lm1b', 'c4/en', your own), or a
  # local builder: 'shakespeare' (embedded) or 'text_files' (dataset.files).
  d.name = 'shakespeare'
  # Where TFDS data lives, local or gs:// (with gcsfs); '' = TFDS default
  # ($TFDS_DATA_DIR or ~/tensorflow_datasets). Shared by all hosts.
  d.data_dir = ''
  d.text_key = 'text'  # The text feature; for text_files also the .jsonl field.
  d.train_split = 'train'
  d.eval_split = 'validation'  # lm1b has none: use 'test' there.
  # text_files only: a folder, glob or comma-separated list of .txt/.md/.jsonl
  # files (local or gs://); .txt/.md = one document, .jsonl = one per line.
  d.files = ''
  d.files_eval_every = 20  # text_files: every Nth document is 'validation'.
  # Data shards: 0 = one per process (each host reads its own block). A fixed
  # number (a multiple of the process count) gives the same global batches
  # for any process count, e.g. to compare a 1-host and a 2-host run.
  d.num_shards = 0
  d.shuffle = True  # Train documents, per host, a new order every epoch.
  d.num_workers = 0  # grain worker processes; 0 = in the main process.
  # Batches prepared ahead: per worker, or by one thread when num_workers=0.
  d.prefetch = 2
  d.read_threads = 2  # Threads reading and tokenising documents (per worker).
  d.read_prefetch = 32  # Documents they keep ready.

  t = c.tokenizer = ml_collections.ConfigDict()
  # A SentencePiece .model (local or gs://); '' = train one into
  # <workdir>/tokenizer from a bounded sample of the train split.
  t.path = ''
  t.model_type = 'unigram'  # unigram | bpe
  # Pieces to train; 0 = model.vocab_size. May be below model.vocab_size
  # (padded for sharding); never above it.
  t.vocab_size = 0
  t.train_max_chars = 3_000_000  # Bounded sample of the train split for training.

  c.seq_len = 128
  # Exactly one of these two is > 0; global = per_device * device count.
  c.global_batch_size = 32
  c.per_device_batch_size = -1

  c.num_train_steps = 500  # ~10 min for the *_small setups on 2 CPU cores.
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.end_learning_rate_ratio = 0.1  # Cosine decays to learning_rate * this.
  c.weight_decay = 0.1  # Not applied to norms or biases.
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.grad_clip_norm = 1.0
  # Speed and memory (docs/performance.md). None of these changes the
  # function computed, so a run may resume or be evaluated with other values.
  # What the backward pass recomputes instead of storing, per block:
  # 'none' (fastest, most memory) | 'dots' (keeps matmul outputs, recomputes
  # norms/softmax/SwiGLU gates) | 'full' (keeps only each block's input).
  c.remat = 'none'
  # Positions per chunk of the logits + loss (0 = all at once); the chunks'
  # logits are recomputed in the backward pass, so the (batch, seq_len, vocab)
  # logits are never all in memory. Must divide seq_len. Use with large vocabularies.
  c.loss_chunk = 0
  # Microbatches per step: the global batch runs in this many sequential
  # pieces whose gradients are summed (same update, 1/k of the activations).
  # global batch / (mesh data*fsdp) must be divisible by it.
  c.grad_accum_steps = 1
  # A step whose loss or gradients are not finite: 'stop' (keep the last good
  # checkpoint, name the step and the first bad quantity, exit 1) or 'skip'
  # (drop that update, count it; stop after max_consecutive_nonfinite in a row).
  c.nonfinite_policy = 'stop'
  c.max_consecutive_nonfinite = 10

  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_batches = 8  # Batches of the eval split per evaluation.
  c.checkpoint_every_steps = 100
  c.max_checkpoints_to_keep = 3

  # Mesh axis sizes within one slice (ICI); -1 takes the devices the others leave.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Axis sizes across slices (DCN), multiplying the above; their product is the
  # number of slices (TPU multislice) or, off TPU, of processes grouped as slices.
  # Usually only data > 1: gradients cross the slow network once per step.
  c.dcn_mesh = ml_collections.ConfigDict()
  c.dcn_mesh.data = 1
  c.dcn_mesh.fsdp = 1
  c.dcn_mesh.tensor = 1

  s = c.sample = ml_collections.ConfigDict()
  s.prompt = 'ROMEO:'
  s.max_new_tokens = 80
  s.temperature = 0.8  # 0 = greedy.
  s.top_k = 40  # 0 = no top-k filtering.
  return c
