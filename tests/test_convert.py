"""Parity with an implementation nobody here wrote: random-weight Hugging Face
models (PyTorch, CPU, eager attention, float32) converted into qvjax give the
same logits. Tolerance: max |diff| <= 1e-4 on logits of magnitude ~1-10,
i.e. float32 rounding of two different summation orders (observed ~1e-5).
Needs the test extra (torch, transformers); skipped where they are missing."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402

from configs import default  # noqa: E402
from qvjax.convert import build, deepseek, llama  # noqa: E402

ATOL = 1e-4
B, T, V = 2, 12, 96
torch.set_num_threads(1)  # The machine is shared; these models are tiny.


def randomize(model, seed=0):
  """HF's init (std 0.02) makes near-uniform attention that would hide a
  wrong key: use larger weights, and norm scales away from 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return model.eval()


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def ids():
  return np.random.default_rng(0).integers(0, V, (B, T))


def llama_model(num_kv_heads, tie=False, same_k_v=False):
  cfg = transformers.LlamaConfig(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
      rms_norm_eps=1e-5, tie_word_embeddings=tie,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500.0})
  cfg._attn_implementation = 'eager'
  model = randomize(transformers.LlamaForCausalLM(cfg))
  if same_k_v:
    with torch.no_grad():
      for layer in model.model.layers:
        layer.self_attn.k_proj.weight.copy_(layer.self_attn.v_proj.weight)
  return cfg, model


@pytest.mark.parametrize('num_kv_heads,tie', [(4, False), (2, False), (1, True)])
def test_llama_logits_match(num_kv_heads, tie):
  """MHA (G = H), GQA (G = 2) and MQA (G = 1, tied embeddings)."""
  cfg, model = llama_model(num_kv_heads, tie)
  m, params = llama.convert(cfg, model.state_dict(), default.get_config().model)
  assert (m.num_kv_heads, m.tie_embeddings, m.norm_eps, m.rope_theta) == (
      num_kv_heads, tie, 1e-5, 500.0)
  want = hf_logits(model, ids())
  got = np.asarray(build(m, params)(jnp.asarray(ids())))
  assert np.abs(want).max() > 1.0  # Not a degenerate comparison.
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_llama_to_qv_drops_wk_and_is_exact_when_wk_was_wv():
  cfg, model = llama_model(2, same_k_v=True)
  m, params = llama.to_qv(cfg, model.state_dict(), default.get_config().model)
  assert m.attention == 'qv' and 'w_k_DGd' not in params['blocks'][0]['attn']
  got = np.asarray(build(m, params)(jnp.asarray(ids())))
  np.testing.assert_allclose(got, hf_logits(model, ids()), rtol=0, atol=ATOL)
  # With a real, different W_K the QV start is another function.
  cfg, model = llama_model(2)
  m, params = llama.to_qv(cfg, model.state_dict(), default.get_config().model)
  got = np.asarray(build(m, params)(jnp.asarray(ids())))
  assert np.abs(got - hf_logits(model, ids())).max() > 0.1


def deepseek_model(q_lora_rank):
  cfg = transformers.DeepseekV2Config(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
      first_k_dense_replace=2, rms_norm_eps=1e-6,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500.0})
  cfg._attn_implementation = 'eager'
  return cfg, randomize(transformers.DeepseekV2ForCausalLM(cfg))


@pytest.mark.parametrize('q_lora_rank', [None, 24])
def test_deepseek_v2_logits_match(q_lora_rank):
  cfg, model = deepseek_model(q_lora_rank)
  m, params = deepseek.convert(cfg, model.state_dict(), default.get_config().model)
  assert m.attention == 'mla' and m.mla.q_lora_rank == (q_lora_rank or 0)
  want = hf_logits(model, ids())
  got = np.asarray(build(m, params)(jnp.asarray(ids())))
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_deepseek_rope_channel_order_matters():
  """Without the interleaved -> half-split permutation the logits differ:
  the rope part of the comparison above is not vacuous."""
  cfg, model = deepseek_model(None)
  m, params = deepseek.convert(cfg, model.state_dict(), default.get_config().model)
  for block in params['blocks'].values():
    block['attn']['w_kr_DP'] = block['attn']['w_kr_DP'][:, np.argsort(
        deepseek.half_split_order(8))]
  got = np.asarray(build(m, params)(jnp.asarray(ids())))
  assert np.abs(got - hf_logits(model, ids())).max() > 1e-2


def test_moe_deepseek_is_refused():
  cfg, model = deepseek_model(None)
  cfg.first_k_dense_replace = 1
  cfg.n_routed_experts = 4
  with pytest.raises(ValueError, match='MoE'):
    deepseek.model_config(cfg, default.get_config().model)
