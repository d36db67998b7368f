"""Tests of qvjax.data: corpus builder, tokenizer and packed batches.

Real Shakespeare (prepared in about a second) backs the builder and tokenizer
tests; a tiny builder of short numbered documents makes document boundaries
and shard membership easy to see in the pipeline tests.
"""

import re
import sys

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from qvjax import data
from qvjax.data import tokenizer as tokenizer_lib

TINY_TRAIN, TINY_EVAL = 40, 6


class TinyDocs(tfds.core.GeneratorBasedBuilder):
  """Documents 'doc <i>: word word ...' of 0..22 words."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS derives both from the module's package, which tests/ is not.
  code_path = epath.Path(__file__)
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, TINY_TRAIN),
            'validation': self._generate_examples(1000, TINY_EVAL)}

  def _generate_examples(self, start, count):
    for i in range(start, start + count):
      yield i, {'text': f'doc {i}: ' + 'word ' * (i * 7 % 23)}


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  c = default.get_config()
  c.dataset.data_dir = str(tmp_path_factory.mktemp('tfds'))
  c.model.vocab_size = 512
  c.tokenizer.train_max_chars = 300_000
  return c


@pytest.fixture(scope='module')
def tok(config, tmp_path_factory):
  return data.get_tokenizer(config, str(tmp_path_factory.mktemp('workdir')))


@pytest.fixture(scope='module')
def tiny(config, tok):
  """Config of the tiny builder, with the Shakespeare tokenizer."""
  c = config.copy_and_resolve_references()
  c.dataset.name = 'tiny_docs'
  c.tokenizer.path = tok.path
  c.seq_len = 32
  return c


def test_builder_prepares_without_tensorflow(config):
  train = data.get_source(config, 'train')
  val = data.get_source(config, 'validation')
  assert 'tensorflow' not in sys.modules
  assert len(train) > 600 and 20 < len(val) < len(train) / 10
  texts = [s[i]['text'].decode() for s in (train, val) for i in range(len(s))]
  assert all(t.strip() for t in texts)
  joined = ''.join(texts)
  for artefact in ('**', '##', '_', '\\', '  \n'):
    assert artefact not in joined, artefact
  assert re.search(r'^ROMEO:$', joined, re.M)
  plays = {s[i]['play'] for s in (train, val) for i in range(len(s))}
  assert len(plays) == 38


def test_unknown_dataset_or_split(config):
  with pytest.raises(ValueError, match="'nope'.*'train', 'validation'"):
    data.get_source(config, 'nope')
  bad = config.copy_and_resolve_references()
  bad.dataset.name = 'no_such_dataset'
  with pytest.raises(ValueError, match='no_such_dataset'):
    data.get_source(bad, 'train')


def test_tokenizer_trains_once_and_round_trips(config, tok, monkeypatch):
  path = epath.Path(tok.path)
  assert path.name == 'spm.model' and path.parent.name == 'tokenizer'
  assert tok.vocab_size == config.model.vocab_size
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  text = 'ROMEO:\nBut, soft!  what light\n\nthrough yonder ☃ window — é'
  assert tok.decode(tok.encode(text)) == text
  monkeypatch.setattr(tokenizer_lib, 'train', lambda _: pytest.fail('retrained'))
  again = data.get_tokenizer(config, str(path.parent.parent))
  assert again.encode(text) == tok.encode(text)


def _train_batches(c, tok, n, process_index=0, process_count=1):
  it = data.make_train_iterator(c, tok, local_batch_size=4,
                                process_index=process_index,
                                process_count=process_count)
  return [next(it) for _ in range(n)]


def _check_batch(b, c, tok):
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'weights'}
  for k, v in b.items():
    assert v.shape == (4, c.seq_len), k
    assert v.dtype == (np.float32 if k == 'weights' else np.int32), k
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  # No loss on padding nor on a new document's bos (predicted across the
  # boundary from the previous document); loss everywhere else.
  real = (b['segment_ids'] != 0) & (b['targets'] != tok.pad_id)
  np.testing.assert_array_equal(b['weights'],
                                real & (b['targets'] != tok.bos_id))
  seg, pos = b['segment_ids'], b['positions']
  starts = np.ones_like(seg, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  np.testing.assert_array_equal(pos[starts & (seg > 0)], 0)
  cont = ~starts & (seg > 0)
  np.testing.assert_array_equal(pos[:, 1:][cont[:, 1:]],
                                pos[:, :-1][cont[:, 1:]] + 1)
  # A segment starting inside a row is a new document: it starts with bos.
  assert np.all(b['inputs'][:, 1:][starts[:, 1:] & (seg[:, 1:] > 0)]
                == tok.bos_id)


def test_train_batches(tiny, tok):
  batches = _train_batches(tiny, tok, 10)
  for b in batches:
    _check_batch(b, tiny, tok)
  weights = np.concatenate([b['weights'] for b in batches])
  assert 0 < (weights == 0).sum() < weights.size  # Boundaries were seen.


def _doc_ids(batches, tok):
  """Numbers of the documents whose start is in these batches."""
  ids = set()
  for b in batches:
    for row, seg in zip(b['inputs'], b['segment_ids']):
      for s in set(seg[seg > 0].tolist()):
        tokens = row[seg == s]
        found = re.match(r'doc (\d+):', tok.decode(tokens[1:]))
        if tokens[0] == tok.bos_id and found:  # Whole 'doc <i>:' in the row.
          ids.add(int(found.group(1)))
  return ids


def test_process_shards_are_disjoint(tiny, tok):
  shards = [_doc_ids(_train_batches(tiny, tok, 30, i, 2), tok) for i in (0, 1)]
  assert shards[0] and shards[1] and not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(TINY_TRAIN))


def test_iterator_state_restores(tiny, tok):
  it = data.make_train_iterator(tiny, tok, local_batch_size=4,
                                process_index=0, process_count=1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  fresh = data.make_train_iterator(tiny, tok, local_batch_size=4,
                                   process_index=0, process_count=1)
  fresh.set_state(state)
  for want, got in zip(expected, (next(fresh) for _ in range(5))):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_eval_batches_fixed_and_padded(tiny, tok):
  kwargs = dict(local_batch_size=4, num_batches=100)
  first = data.make_eval_batches(tiny, tok, process_index=0, process_count=1,
                                 **kwargs)
  second = data.make_eval_batches(tiny, tok, process_index=0, process_count=1,
                                  **kwargs)
  assert 1 <= len(first) < 100  # The tiny split runs out early.
  for a, b in zip(first, second, strict=True):
    _check_batch(a, tiny, tok)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert (first[-1]['segment_ids'] == 0).any()  # The tail is padded.
  hosts = [data.make_eval_batches(tiny, tok, process_index=i, process_count=2,
                                  **kwargs) for i in (0, 1)]
  assert len(hosts[0]) == len(hosts[1])
