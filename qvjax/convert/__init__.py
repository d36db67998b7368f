"""Checkpoints of other implementations -> qvjax params and model config.

  llama.py     LlamaForCausalLM     -> qkv (MHA / GQA / MQA), or a QV start
  deepseek.py  DeepseekV2ForCausalLM (MLA layers, dense MLPs) -> mla

Each takes a Hugging Face config (object or dict) and state dict (torch
tensors or arrays; torch itself is never imported here) and returns
(model config, params) where params is the pure dict of `nnx.state(Decoder)`.
`build` turns that pair into a Decoder without a random init first.
"""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from qvjax.model import Decoder


def hf_get(hf_config, key, default=None):
  """A field of a transformers config object or of its dict form."""
  if isinstance(hf_config, dict):
    return hf_config.get(key, default)
  return getattr(hf_config, key, default)


def rope_theta(hf_config) -> float:
  """rope_theta from a plain-RoPE config (transformers 5 nests it in
  rope_parameters); refuses the scaled variants qvjax lacks."""
  params = hf_get(hf_config, 'rope_parameters') or hf_get(hf_config, 'rope_scaling') or {}
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind != 'default':
    raise ValueError(f'rope_type={kind!r} is not supported (qvjax has plain RoPE only)')
  return float(params.get('rope_theta', hf_get(hf_config, 'rope_theta', 10_000.0)))


def array(t) -> np.ndarray:
  """float32 numpy from a torch tensor or any array."""
  if hasattr(t, 'detach'):
    t = t.detach().cpu().float().numpy()
  return np.asarray(t, np.float32)


def base_model(base: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of a model config section with the checkpoint's fields set."""
  m = copy.deepcopy(base)
  m.update(fields)
  return m


def embedding(sd, m, prefix='model.'):
  """Embedding and head. qvjax multiplies the embedding by D^-0.5 going in
  (and going out when tied); storing sqrt(D) E makes both equal HF's E."""
  out = {'embed_VD': array(sd[f'{prefix}embed_tokens.weight']) * np.float32(m.emb_dim ** 0.5),
         'final_norm': {'scale': array(sd[f'{prefix}norm.weight'])}}
  if not m.tie_embeddings:
    out['head_DV'] = array(sd['lm_head.weight']).T
  return out


def mlp_and_norms(sd, prefix):
  """SwiGLU weights and the two RMSNorm scales of one HF decoder layer."""
  return {
      'attn_norm': {'scale': array(sd[f'{prefix}input_layernorm.weight'])},
      'mlp_norm': {'scale': array(sd[f'{prefix}post_attention_layernorm.weight'])},
      'mlp': {'w_gate_DF': array(sd[f'{prefix}mlp.gate_proj.weight']).T,
              'w_up_DF': array(sd[f'{prefix}mlp.up_proj.weight']).T,
              'w_down_FD': array(sd[f'{prefix}mlp.down_proj.weight']).T},
  }


def decoder_params(sd, m, attention) -> dict:
  """Embedding, then per layer the MLP, norms and `attention(sd, prefix, m)`."""
  params = embedding(sd, m)
  params['blocks'] = {i: {**mlp_and_norms(sd, f'model.layers.{i}.'),
                          'attn': attention(sd, f'model.layers.{i}.', m)}
                      for i in range(m.num_layers)}
  return params


def build(m: ml_collections.ConfigDict, params: dict) -> Decoder:
  """A Decoder holding `params`; every shape is checked against the config."""
  abstract = nnx.eval_shape(lambda: Decoder(m, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  want = nnx.to_pure_dict(state)
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  if [p for p, _ in paths] != [p for p, _ in got]:
    raise ValueError(f'params do not match the model: {sorted(map(str, (p for p, _ in got)))}')
  for (path, w), (_, g) in zip(paths, got):
    if tuple(w.shape) != tuple(np.shape(g)):
      raise ValueError(f'{jax.tree_util.keystr(path)}: shape {np.shape(g)}, model wants {w.shape}')
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
