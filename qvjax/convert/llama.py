"""Hugging Face LlamaForCausalLM -> qvjax qkv, and Llama/GQA -> a QV start.

Llama is qvjax's decoder with attention=qkv: pre-norm RMSNorm blocks,
SwiGLU MLP, no biases, RoPE in the rotate_half layout (qvjax's apply_rope
pairs channel k with k + d/2 too), an untied or tied head. Weights map one to
one, transposed from torch's (out, in); the embedding is stored times
sqrt(D) (see convert.embedding). RMSNorm eps and rope_theta come across.

`to_qv` drops W_K and keeps W_V: scores become q . RoPE(v) instead of
q . RoPE(k). That is not the same function: the pretrained attention
patterns are lost, everything else (embeddings, MLPs, W_Q, W_V, W_O, norms)
is kept. It is a starting point for continued pretraining (as GQA is
up-trained from MHA checkpoints), with half the KV cache. It is exact only
for a Llama whose W_K equals W_V (the identity tests/test_convert.py pins).
"""

from qvjax.convert import array, base_model, decoder_params, hf_get, rope_theta


def model_config(hf, base):
  for flag in ('attention_bias', 'mlp_bias'):
    if hf_get(hf, flag, False):
      raise ValueError(f'{flag}=True is not supported (qvjax has no biases)')
  if hf_get(hf, 'hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf_get(hf, "hidden_act")!r}: qvjax has SwiGLU (silu) only')
  D, H = hf_get(hf, 'hidden_size'), hf_get(hf, 'num_attention_heads')
  return base_model(
      base, attention='qkv', num_layers=hf_get(hf, 'num_hidden_layers'), emb_dim=D,
      num_heads=H, num_kv_heads=hf_get(hf, 'num_key_value_heads') or H,
      head_dim=hf_get(hf, 'head_dim') or D // H, mlp_dim=hf_get(hf, 'intermediate_size'),
      vocab_size=hf_get(hf, 'vocab_size'), position='rope', rope_theta=rope_theta(hf),
      tie_embeddings=bool(hf_get(hf, 'tie_word_embeddings', False)),
      norm_eps=float(hf_get(hf, 'rms_norm_eps')))


def attention(sd, prefix, m):
  """torch (H*d, D) projections -> (D, H, d); o_proj (D, H*d) -> (H, d, D)."""
  D, H, G, d = m.emb_dim, m.num_heads, m.num_kv_heads, m.head_dim
  w = lambda name: array(sd[f'{prefix}self_attn.{name}.weight'])
  return {'w_q_DHd': w('q_proj').T.reshape(D, H, d),
          'w_k_DGd': w('k_proj').T.reshape(D, G, d),
          'w_v_DGd': w('v_proj').T.reshape(D, G, d),
          'w_o_HdD': w('o_proj').T.reshape(H, d, D)}


def convert(hf_config, state_dict, base):
  """(model config, params) of a qvjax qkv decoder equal to the Llama.
  `base`: a model config section supplying the knobs Llama does not set
  (dtype, init_std, ...), e.g. configs.default.get_config().model."""
  m = model_config(hf_config, base)
  return m, decoder_params(state_dict, m, attention)


def to_qv(hf_config, state_dict, base):
  """A QV decoder started from a Llama: W_K dropped, all else kept."""
  m, params = convert(hf_config, state_dict, base)
  m.attention = 'qv'
  for block in params['blocks'].values():
    del block['attn']['w_k_DGd']
  return m, params
