"""Hugging Face DeepseekV2ForCausalLM (MLA attention, dense MLPs) -> qvjax mla.

Mapping (torch weights are (out, in)):
  q_proj, or q_a_proj / q_a_layernorm / q_b_proj -> w_q_DHk, or w_dq_DQ / q_norm / w_uq_QHk
  kv_a_proj_with_mqa = [W_DKV ; W_KR]             -> w_dkv_DC, w_kr_DP
  kv_a_layernorm                                  -> kv_norm
  kv_b_proj = per head [W_UK ; W_UV]              -> w_uk_CHn, w_uv_CHe
  o_proj                                          -> w_o_HeD
DeepSeek rotates interleaved channel pairs (2i, 2i+1) (complex
multiplication); qvjax pairs (i, i + p/2). Permuting the rope output
channels of the query and key projections to [0, 2, 4, ..., 1, 3, 5, ...]
turns one into the other exactly, and leaves q_rope . k_rope unchanged.

Refused, with a ValueError: MoE layers (set first_k_dense_replace >= the
layer count), scaled RoPE (YaRN), biases, and an rms_norm_eps other than
1e-6 (transformers fixes the latent norms' eps at 1e-6 while qvjax uses
model.norm_eps for all norms).
"""

import numpy as np

from qvjax.convert import array, base_model, decoder_params, hf_get, rope_theta


def model_config(hf, base):
  L = hf_get(hf, 'num_hidden_layers')
  if hf_get(hf, 'n_routed_experts') and hf_get(hf, 'first_k_dense_replace', 0) < L:
    raise ValueError('MoE layers are not supported: need first_k_dense_replace >= '
                     f'num_hidden_layers={L} (dense MLPs only)')
  if hf_get(hf, 'attention_bias', False) or hf_get(hf, 'mlp_bias', False):
    raise ValueError('biases are not supported (qvjax has none)')
  if float(hf_get(hf, 'rms_norm_eps')) != 1e-6:
    raise ValueError('rms_norm_eps must be 1e-6: transformers uses 1e-6 for the latent '
                     'norms, qvjax one model.norm_eps for every norm')
  H = hf_get(hf, 'num_attention_heads')
  if (hf_get(hf, 'num_key_value_heads') or H) != H:
    raise ValueError('num_key_value_heads must equal num_attention_heads for MLA')
  e = hf_get(hf, 'v_head_dim')
  m = base_model(
      base, attention='mla', num_layers=L, emb_dim=hf_get(hf, 'hidden_size'), num_heads=H,
      num_kv_heads=H, head_dim=e, mlp_dim=hf_get(hf, 'intermediate_size'),
      vocab_size=hf_get(hf, 'vocab_size'), position='rope', rope_theta=rope_theta(hf),
      tie_embeddings=bool(hf_get(hf, 'tie_word_embeddings', False)), norm_eps=1e-6)
  m.mla.update(q_lora_rank=hf_get(hf, 'q_lora_rank') or 0,
               kv_lora_rank=hf_get(hf, 'kv_lora_rank'),
               qk_nope_head_dim=hf_get(hf, 'qk_nope_head_dim'),
               qk_rope_head_dim=hf_get(hf, 'qk_rope_head_dim'), v_head_dim=e)
  return m


def half_split_order(p: int) -> np.ndarray:
  """Channel order taking interleaved rope pairs to qvjax's halves."""
  return np.concatenate([np.arange(0, p, 2), np.arange(1, p, 2)])


def attention(sd, prefix, m):
  x, H, D = m.mla, m.num_heads, m.emb_dim
  n, p, e, r = x.qk_nope_head_dim, x.qk_rope_head_dim, x.v_head_dim, x.kv_lora_rank
  w = lambda name: array(sd[f'{prefix}self_attn.{name}.weight'])
  order = np.concatenate([np.arange(n), n + half_split_order(p)])
  out = {}
  if x.q_lora_rank:
    out['w_dq_DQ'] = w('q_a_proj').T
    out['q_norm'] = {'scale': w('q_a_layernorm')}
    out['w_uq_QHk'] = w('q_b_proj').T.reshape(x.q_lora_rank, H, n + p)[:, :, order]
  else:
    out['w_q_DHk'] = w('q_proj').T.reshape(D, H, n + p)[:, :, order]
  kv_a = w('kv_a_proj_with_mqa').T  # (D, r + p)
  out['w_dkv_DC'] = kv_a[:, :r]
  out['w_kr_DP'] = kv_a[:, r:][:, half_split_order(p)]
  out['kv_norm'] = {'scale': w('kv_a_layernorm')}
  kv_b = w('kv_b_proj').reshape(H, n + e, r)
  out['w_uk_CHn'] = kv_b[:, :n].transpose(2, 0, 1)
  out['w_uv_CHe'] = kv_b[:, n:].transpose(2, 0, 1)
  out['w_o_HeD'] = w('o_proj').T.reshape(H, e, D)
  return out


def convert(hf_config, state_dict, base):
  """(model config, params) of a qvjax mla decoder equal to the DeepSeek-V2."""
  m = model_config(hf_config, base)
  return m, decoder_params(state_dict, m, attention)
