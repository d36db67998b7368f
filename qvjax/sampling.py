"""Text generation with a KV cache (qvjax.decode).

Two compiled functions: a prefill over a fixed window of seq_len slots (the
prompt padded, so any prompt length reuses one compile) and a one-token
step. When the window is full, the last seq_len/2 tokens are prefilled
again and decoding goes on: positions never exceed what training saw.
Ids the tokenizer cannot produce (pad, bos, and the padding rows of a model
vocabulary larger than the tokenizer's) are never sampled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvjax import decode


def sample_logits(logits_BV, rng, temperature: float, top_k: int, allowed_V=None):
  """Greedy at temperature 0; else softmax(logits / T) over the top_k.
  Ids where `allowed_V` is False are never returned."""
  if allowed_V is not None:
    logits_BV = jnp.where(allowed_V, logits_BV, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1)
  logits_BV = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1)


def allowed_ids(model_vocab: int, tokenizer) -> np.ndarray:
  allowed = np.arange(model_vocab) < tokenizer.vocab_size
  allowed[[tokenizer.pad_id, tokenizer.bos_id]] = False
  return allowed


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _prefill(graphdef, model_state, window_BS, length, rng, allowed_V, temperature, top_k):
  model = nnx.merge(graphdef, model_state)
  B, S = window_BS.shape
  cache = decode.init_cache(model.cfg, B, S)
  logits_BSV, cache = decode.extend(model, cache, window_BS)
  # Slots past `length` hold padding; the next step overwrites them.
  cache['index'] = jnp.asarray(length, jnp.int32)
  last_BV = jax.lax.dynamic_index_in_dim(logits_BSV, length - 1, axis=1, keepdims=False)
  return sample_logits(last_BV, rng, temperature, top_k, allowed_V), cache


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=2)
def _step(graphdef, model_state, cache, token_B, rng, allowed_V, temperature, top_k):
  model = nnx.merge(graphdef, model_state)
  logits_B1V, cache = decode.extend(model, cache, token_B[:, None])
  return sample_logits(logits_B1V[:, 0], rng, temperature, top_k, allowed_V), cache


def generate_ids(graphdef, model_state, ids, *, seq_len: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int, allowed_V, stop_id=None,
                 on_token=None) -> list[int]:
  """Continues `ids` (bos included); returns the new ids (stop_id excluded)."""
  rng = jax.random.key(seed)
  args = (allowed_V, float(temperature), int(top_k))

  def prefill(context, rng):
    window = np.zeros((1, seq_len), np.int32)
    window[0, :len(context)] = context
    return _prefill(graphdef, model_state, jnp.asarray(window), len(context), rng, *args)

  ids, new = list(ids), []
  rng, sub = jax.random.split(rng)
  context = ids[-seq_len:]
  token, cache = prefill(context, sub)
  filled = len(context)
  for _ in range(max_new_tokens):
    token_id = int(token[0])
    if token_id == stop_id:
      break
    new.append(token_id)
    if on_token is not None:
      on_token(new)
    if len(new) == max_new_tokens:
      break
    rng, sub = jax.random.split(rng)
    if filled == seq_len:  # Window full: keep the last half, prefill again.
      context = (ids + new)[-(seq_len // 2):]
      token, cache = prefill(context, sub)
      filled = len(context)
    else:
      token, cache = _step(graphdef, model_state, cache, token, sub, *args)
      filled += 1
  return new


def generate(graphdef, model_state, tokenizer, prompt: str, *, seq_len: int,
             max_new_tokens: int, temperature: float, top_k: int, seed: int,
             on_text=None) -> str:
  """Returns prompt + continuation; `on_text(piece)` streams each new piece."""
  prompt_ids = tokenizer.encode(prompt)
  vocab = nnx.merge(graphdef, model_state).cfg.vocab_size
  shown = [tokenizer.decode(prompt_ids)]

  def stream(new):
    text = tokenizer.decode(prompt_ids + new)
    if on_text is not None:
      on_text(text[len(shown[0]):])
    shown[0] = text

  new = generate_ids(graphdef, model_state, [tokenizer.bos_id] + prompt_ids, seq_len=seq_len,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     seed=seed, allowed_V=jnp.asarray(allowed_ids(vocab, tokenizer)),
                     stop_id=tokenizer.eos_id, on_token=stream)
  return tokenizer.decode(prompt_ids + new)
