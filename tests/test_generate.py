"""--mode=generate's entry point, qvjax.generate.run: it restores the
workdir's latest params (not a fresh init), reports the cache size and
streams the same text the in-memory sampler gives."""

import io
import os

import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm
from flax import nnx

from configs import tiny
from qvjax import checkpoint, decode, generate, sampling
from qvjax.config import ConfigError
from qvjax.data import tokenizer as tokenizer_lib
from qvjax.model import Decoder

LINES = [
    'ROMEO: But soft, what light through yonder window breaks?',
    'JULIET: O Romeo, Romeo, wherefore art thou Romeo?',
    'MERCUTIO: A plague on both your houses! They have made worms meat of me.',
    'FRIAR LAURENCE: These violent delights have violent ends.',
    'NURSE: Faith, I can tell how to look for the county, madam.',
    'TYBALT: What, drawn, and talk of peace! I hate the word.',
] * 8


def write_tokenizer(path, vocab_size=340):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES), model_writer=model, vocab_size=vocab_size,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True, minloglevel=2,
      num_threads=1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(model.getvalue())


def tiny_config():
  c = tiny.get_config()
  c.model.attention = 'mla'
  c.model.vocab_size = 360  # Larger than the tokenizer's 340: 20 padding ids.
  c.seq_len = 16
  return c


def test_generate_restores_params_and_streams(tmp_path, capsys):
  c, workdir = tiny_config(), str(tmp_path)
  write_tokenizer(os.path.join(workdir, 'tokenizer', 'spm.model'))
  # Trained params differ from a fresh init: save a model of another seed.
  model = Decoder(c.model, nnx.Rngs(123))
  manager = checkpoint.make_manager(workdir, c)
  for step in (3, 7):  # The latest is the one to use.
    params = nnx.to_pure_dict(nnx.state(Decoder(c.model, nnx.Rngs(step))) if step == 3
                              else nnx.state(model))
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({'model': c.model.to_dict(), 'step': step})))
  manager.wait_until_finished()
  manager.close()

  text = generate.run(c, workdir, prompt='ROMEO:', max_new_tokens=10, temperature=0.0,
                      top_k=0, seed=0)
  out = capsys.readouterr().out
  per_token = decode.cache_bytes_per_token(c.model)
  assert per_token == 2 * (16 + 4) * 4  # 2 layers of latent + rope key, float32.
  assert f'{per_token} bytes/token' in out and 'step 7' in out
  tok = tokenizer_lib.load(os.path.join(workdir, 'tokenizer', 'spm.model'))
  graphdef, state = nnx.split(model)
  want = sampling.generate(graphdef, state, tok, 'ROMEO:', seq_len=c.seq_len,
                           max_new_tokens=10, temperature=0.0, top_k=0, seed=0)
  assert text == want and text.startswith('ROMEO:') and len(text) > len('ROMEO:')
  assert text in out  # Streamed, piece by piece, to stdout.


def test_generate_without_checkpoint_is_a_config_error(tmp_path):
  c, workdir = tiny_config(), str(tmp_path)
  write_tokenizer(os.path.join(workdir, 'tokenizer', 'spm.model'))
  with pytest.raises(ConfigError, match='no checkpoint'):
    generate.run(c, workdir, prompt='x', max_new_tokens=2, temperature=0.0, top_k=0, seed=0)
