"""Text generation by repeated full forward passes over a fixed window.

Simple and shape-stable (one compile): the window holds the last seq_len
tokens; each step samples from the logits at the last filled slot. A KV-cache
decoder replaces this in qvjax.decode once it exists (issue 3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_V, rng, temperature: float, top_k: int):
  """Greedy at temperature 0; else softmax(logits / T) over the top_k."""
  if temperature == 0:
    return jnp.argmax(logits_V, axis=-1)
  logits_V = logits_V / temperature
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  return jax.random.categorical(rng, logits_V, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _next_token(graphdef, model_state, window_1T, last, rng, temperature, top_k):
  model = nnx.merge(graphdef, model_state)
  logits_1TV = model(window_1T)
  return sample_logits(logits_1TV[0, last], rng, temperature, top_k)


def generate(graphdef, model_state, tokenizer, prompt: str, *, seq_len: int,
             max_new_tokens: int, temperature: float, top_k: int, seed: int,
             on_text=None) -> str:
  """Returns prompt + continuation; `on_text(piece)` streams each new piece."""
  prompt_ids = tokenizer.encode(prompt)
  ids = [tokenizer.bos_id] + prompt_ids
  rng = jax.random.key(seed)
  new = []
  shown = tokenizer.decode(prompt_ids)
  for _ in range(max_new_tokens):
    context = (ids + new)[-seq_len:]
    window = np.zeros((1, seq_len), np.int32)
    window[0, :len(context)] = context
    rng, step_rng = jax.random.split(rng)
    token = int(_next_token(graphdef, model_state, jnp.asarray(window), len(context) - 1,
                            step_rng, float(temperature), int(top_k)))
    if token == tokenizer.eos_id:
      break
    new.append(token)
    text = tokenizer.decode(prompt_ids + new)
    if on_text is not None:
      on_text(text[len(shown):])
    shown = text
  return tokenizer.decode(prompt_ids + new)
