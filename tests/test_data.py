"""Tests of qvjax.data: corpus builder, tokenizer and packed batches.

Real Shakespeare (prepared in about a second) backs the builder and tokenizer
tests; a tiny builder of short numbered documents, prepared here like any
TFDS dataset, makes document boundaries and shard membership easy to see in
the pipeline tests. (Errors and the text_files builder: test_data_sources.py.)
"""

import hashlib
import re
import shutil
import sys
import threading

from etils import epath
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import default
from qvjax import data
from qvjax.attention.base import attention_mask
from qvjax.config import ConfigError
from qvjax.data import tokenizer as tokenizer_lib

TINY_TRAIN, TINY_EVAL = 41, 6


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
  """Config of the tiny builder (prepared here), with the Shakespeare tokenizer."""
  TinyDocs(data_dir=config.dataset.data_dir).download_and_prepare(
      file_format='array_record')
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


def test_tokenizer_trains_once_and_round_trips(config, tok, monkeypatch):
  path = epath.Path(tok.path)
  assert path.name == 'spm.model' and path.parent.name == 'tokenizer'
  assert tok.vocab_size == config.model.vocab_size  # tokenizer.vocab_size=0
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  text = 'ROMEO:\nBut, soft!  what light\n\nthrough yonder ☃ window — é'
  assert tok.decode(tok.encode(text)) == text
  monkeypatch.setattr(tokenizer_lib, 'train', lambda _: pytest.fail('retrained'))
  again = data.get_tokenizer(config, str(path.parent.parent))
  assert again.encode(text) == tok.encode(text)


@pytest.fixture(scope='module')
def bpe(config, tmp_path_factory):
  """A BPE tokenizer of 400 pieces for a model of 512 (padded) ids."""
  c = config.copy_and_resolve_references()
  c.tokenizer.model_type = 'bpe'
  c.tokenizer.vocab_size = 400
  c.tokenizer.train_max_chars = 100_000
  return c, data.get_tokenizer(c, str(tmp_path_factory.mktemp('bpe')))


def test_bpe_tokenizer_smaller_than_the_model(bpe, tok):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  c, small = bpe
  assert small.vocab_size == 400 < c.model.vocab_size
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(small.processor.serialized_model_proto())
  assert proto.trainer_spec.model_type == proto.trainer_spec.BPE
  text = 'KING LEAR:\nBlow, winds, and crack your cheeks!'
  assert small.decode(small.encode(text)) == text
  assert max(small.encode(text * 20)) < small.vocab_size
  data.check_vocab(c, small)  # 400 pieces in a model of 512 ids: fine.
  c.model.vocab_size = 384
  with pytest.raises(ConfigError, match=r'model.vocab_size=384 .* 400 pieces'):
    data.check_vocab(c, small)
  c.model.vocab_size = 512
  with pytest.raises(ConfigError, match=r'tokenizer.vocab_size=400 .* 512 pieces'):
    data.check_vocab(c, tok)  # The workdir holds a tokenizer of another size.


def test_fingerprint_and_mismatch(bpe, tok, tmp_path):
  fingerprint = data.tokenizer_fingerprint(tok)
  model = epath.Path(tok.path).read_bytes()
  assert fingerprint == {'path': tok.path, 'vocab_size': 512,
                         'sha256': hashlib.sha256(model).hexdigest()}
  data.check_tokenizer(fingerprint, tok)
  copy = tmp_path / 'copy.model'
  copy.write_bytes(model)
  data.check_tokenizer(fingerprint, tokenizer_lib.load(str(copy)))  # Same model.
  other = bpe[1]
  with pytest.raises(ConfigError) as e:
    data.check_tokenizer(fingerprint, other)
  message = str(e.value)
  assert tok.path in message and other.path in message
  assert '512 pieces' in message and '400 pieces' in message
  assert '\n' not in message
  # Older checkpoints recorded a path (and the vocab size, separately).
  data.check_tokenizer(tok.path, other)
  data.check_tokenizer({'path': tok.path, 'vocab_size': None}, other)
  with pytest.raises(ConfigError, match='400 pieces'):
    data.check_tokenizer({'path': tok.path, 'vocab_size': 512}, other)


def test_tokenizer_path_errors(config, tmp_path):
  c = config.copy_and_resolve_references()
  c.tokenizer.path = str(tmp_path / 'missing.model')
  with pytest.raises(ConfigError, match='missing.model.*not found'):
    data.get_tokenizer(c, str(tmp_path))
  (tmp_path / 'junk.model').write_bytes(b'not a model')
  c.tokenizer.path = str(tmp_path / 'junk.model')
  with pytest.raises(ConfigError, match='junk.model.*not a SentencePiece'):
    data.get_tokenizer(c, str(tmp_path))


def test_other_processes_wait_for_process_0s_tokenizer(config, tok, tmp_path,
                                                       monkeypatch):
  monkeypatch.setattr(tokenizer_lib.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(tokenizer_lib, 'train', lambda _: pytest.fail('trained'))
  monkeypatch.setattr(tokenizer_lib, '_POLL_S', 0.02)
  monkeypatch.setattr(tokenizer_lib, 'WAIT_TIMEOUT_S', 0.1)
  with pytest.raises(TimeoutError, match='process 0'):
    data.get_tokenizer(config, str(tmp_path / 'lonely'))
  monkeypatch.setattr(tokenizer_lib, 'WAIT_TIMEOUT_S', 30.0)
  target = tmp_path / 'run' / 'tokenizer' / 'spm.model'

  def process_0():
    target.parent.mkdir(parents=True)
    shutil.copy(tok.path, target)

  writer = threading.Timer(0.2, process_0)
  writer.start()
  got = data.get_tokenizer(config, str(tmp_path / 'run'))
  writer.join()
  assert got.sha256 == tok.sha256


def _iterator(c, tok, process_index=0, process_count=1):
  return data.make_train_iterator(c, tok, local_batch_size=4,
                                  process_index=process_index,
                                  process_count=process_count)


def _train_batches(c, tok, n, process_index=0, process_count=1):
  it = _iterator(c, tok, process_index, process_count)
  batches = [next(it) for _ in range(n)]
  it.close()
  return batches


def _check_batch(b, c, tok, rows=4):
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'weights'}
  for k, v in b.items():
    assert v.shape == (rows, c.seq_len), k
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
  assert 'tensorflow' not in sys.modules


def _assert_attention_stays_in_documents(b, tok):
  """The model's mask from the batch's segment ids == causal attention within
  documents, the documents found independently: each starts at its bos."""
  doc = np.cumsum(b['inputs'] == tok.bos_id, axis=1)  # Row start: doc 0.
  real = b['segment_ids'] > 0
  mask = np.asarray(attention_mask(b['segment_ids']))[:, 0]  # (B, q, k)
  causal = np.tril(np.ones(mask.shape[1:], bool))
  want = (doc[:, :, None] == doc[:, None, :]) & causal
  both_real = real[:, :, None] & real[:, None, :]
  np.testing.assert_array_equal(mask & both_real, want & both_real)
  # Real tokens never attend to padding, nor padding to real tokens.
  assert not (mask & (real[:, :, None] != real[:, None, :])).any()


def test_attention_never_crosses_documents(tiny, tok):
  train = _train_batches(tiny, tok, 6)
  evals = data.make_eval_batches(tiny, tok, local_batch_size=4, num_batches=5,
                                 process_index=0, process_count=1)
  packed_rows = 0
  for b in train + evals:
    _assert_attention_stays_in_documents(b, tok)
    packed_rows += (b['segment_ids'].max(axis=1) > 1).sum()
  assert packed_rows > 10  # Rows with several documents were checked.
  # The check can fail: one segment id over two documents lets them mix.
  b = dict(train[0])
  b['segment_ids'] = np.where(b['segment_ids'] > 0, 1, 0).astype(np.int32)
  with pytest.raises(AssertionError):
    _assert_attention_stays_in_documents(b, tok)


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


def _numbers(c, tok, process_index, process_count, n):
  docs = data.train_documents(c, shard=process_index, num_shards=process_count)
  return [int(re.match(rb'doc (\d+)', docs[i]['text']).group(1))
          for i in range(n)]


def test_hosts_split_the_data_without_overlap(tiny, tok):
  c = tiny.copy_and_resolve_references()
  c.dataset.shuffle = False
  stored = _numbers(c, tok, 0, 1, TINY_TRAIN)  # TFDS's stored order.
  sizes = [(TINY_TRAIN + 1) // 2, TINY_TRAIN // 2]  # 21, 20
  blocks = [_numbers(tiny, tok, i, 2, sizes[i]) for i in (0, 1)]
  # tfds.split_for_jax_process: contiguous blocks of the stored order.
  assert sorted(blocks[0]) == sorted(stored[:sizes[0]])
  assert sorted(blocks[1]) == sorted(stored[sizes[0]:])
  assert set(blocks[0]).isdisjoint(blocks[1])
  assert set(blocks[0]) | set(blocks[1]) == set(range(TINY_TRAIN))
  # The same holds for the packed batches each host trains on.
  shards = [_doc_ids(_train_batches(tiny, tok, 30, i, 2), tok) for i in (0, 1)]
  assert shards[0] == set(blocks[0]) and shards[1] == set(blocks[1])
  # Any TFDS split string is split the same way (each part of a '+').
  c.dataset.train_split = 'train[:7]+validation[:2]'
  whole = _numbers(c, tok, 0, 1, 9)
  sizes = [len(data.get_source(c, c.dataset.train_split, process_index=i,
                               process_count=3)) for i in range(3)]
  assert sizes == [3 + 1, 2 + 1, 2 + 0]
  parts = [_numbers(c, tok, i, 3, sizes[i]) for i in range(3)]
  assert sorted(sum(parts, [])) == sorted(whole) and whole[:7] == stored[:7]


def test_epochs_reshuffle_and_cover_each_document_once(tiny, tok):
  n = (TINY_TRAIN + 1) // 2
  order = _numbers(tiny, tok, 0, 2, 3 * n)
  epochs = [order[i * n:(i + 1) * n] for i in range(3)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
  assert len(set(epochs[0])) == n
  assert epochs[0] != epochs[1] != epochs[2]  # A new order every epoch,
  assert order == _numbers(tiny, tok, 0, 2, 3 * n)  # the same in every run,
  other = tiny.copy_and_resolve_references()
  other.seed = 1
  assert _numbers(other, tok, 0, 2, n) != epochs[0]  # and seeded by config.seed.
  other.dataset.shuffle = False
  unshuffled = _numbers(other, tok, 0, 2, 2 * n)
  assert unshuffled[:n] == unshuffled[n:] != epochs[0]
  assert set(unshuffled[:n]) == set(epochs[0])


def _assert_same(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _resume_through_orbax(c, tok, directory, skip=7, check=12):
  """Batches [skip, skip + check) of an uninterrupted iterator, and of one
  restored from an Orbax checkpoint taken after `skip` batches."""
  it = _iterator(c, tok)
  for _ in range(skip):
    next(it)
  with ocp.CheckpointManager(directory, item_names=('data',)) as manager:
    manager.save(skip, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(check)]
    it.close()
    fresh = _iterator(c, tok)
    manager.restore(skip, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
    got = [next(fresh) for _ in range(check)]
    fresh.close()
  return expected, got


def test_resume_is_exact_through_an_orbax_checkpoint(tiny, tok, tmp_path):
  # 19 batches of 128 tokens span about three epochs of the tiny split.
  expected, got = _resume_through_orbax(tiny, tok, tmp_path / 'ckpt')
  _assert_same(expected, got)
  # The test can fail: a fresh iterator starts elsewhere.
  with pytest.raises(AssertionError):
    _assert_same(expected, _train_batches(tiny, tok, 12))


def test_worker_processes_batch_and_resume_exactly(tiny, tok, tmp_path):
  c = tiny.copy_and_resolve_references()
  c.dataset.num_workers = 1
  expected, got = _resume_through_orbax(c, tok, tmp_path / 'ckpt', skip=3,
                                        check=4)
  _assert_same(expected, got)
  for b in got:
    _check_batch(b, c, tok)
  assert 'tensorflow' not in sys.modules


def test_eval_batches_fixed_and_padded(tiny, tok):
  kwargs = dict(local_batch_size=4, num_batches=100)
  first = data.make_eval_batches(tiny, tok, process_index=0, process_count=1,
                                 **kwargs)
  second = data.make_eval_batches(tiny, tok, process_index=0, process_count=1,
                                  **kwargs)
  assert 1 <= len(first) < 100  # The tiny split runs out early.
  for a in first:
    _check_batch(a, tiny, tok)
  _assert_same(first, second)
  assert (first[-1]['segment_ids'] == 0).any()  # The tail is padded.
  # Two hosts of 2 rows each evaluate exactly the rows one host of 4 does.
  hosts = [data.make_eval_batches(tiny, tok, process_index=i, process_count=2,
                                  local_batch_size=2, num_batches=100)
           for i in (0, 1)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
            for a, b in zip(*hosts, strict=True)]
  _assert_same(first, joined)


def test_bench_measures_the_training_iterator(tiny, tok, tmp_path):
  from qvjax.data import bench  # pylint: disable=g-import-not-at-top
  r = bench.run(tiny, str(tmp_path), batches=20, warmup=2, process_index=1,
                process_count=2)
  assert r['local_batch'] == tiny.global_batch_size // 2
  assert r['tokenizer'].sha256 == tok.sha256
  assert r['tokens_per_s'] == pytest.approx(
      r['batches_per_s'] * r['local_batch'] * tiny.seq_len)
  assert r['tokens_per_s'] > 0 and 0.5 < r['loss_fraction'] < 1


def test_fixed_num_shards_gives_the_same_global_batches_for_any_host_count(tiny, tok):
  c = tiny.copy_and_resolve_references()
  c.dataset.num_shards = 2
  one = data.make_train_iterator(c, tok, local_batch_size=4, process_index=0, process_count=1)
  hosts = [data.make_train_iterator(c, tok, local_batch_size=2, process_index=p,
                                    process_count=2) for p in (0, 1)]
  rows = lambda batch: sorted(map(tuple, batch['inputs'].tolist()))
  for _ in range(3):
    single = next(one)
    both = [next(h) for h in hosts]
    assert rows(single) == sorted(rows(both[0]) + rows(both[1]))
  c.dataset.num_shards = 3
  with pytest.raises(ConfigError, match='num_shards=3'):
    data.make_train_iterator(c, tok, local_batch_size=2, process_index=0, process_count=2)
