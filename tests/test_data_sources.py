"""Tests of qvjax.data sources: what a user can ask for, and the one-line
errors for what is not there; and the text_files builder over a folder of
the user's own .txt/.md/.jsonl files. No network, no TensorFlow."""

import json
import os
import shutil
import sys

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from qvjax import data
from qvjax.config import ConfigError
from qvjax.data import sources


class NumberedDocs(tfds.core.GeneratorBasedBuilder):
  """12 train and 3 validation documents, with a number beside the text."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'body': tfds.features.Text(),
        'number': tfds.features.Scalar(np.int32),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 12),
            'validation': self._generate_examples(100, 3)}

  def _generate_examples(self, start, count):
    for i in range(start, start + count):
      yield i, {'body': f'document {i}', 'number': i}


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  NumberedDocs(data_dir=str(root)).download_and_prepare(file_format='array_record')
  c = default.get_config()
  c.dataset.name = 'numbered_docs'
  c.dataset.data_dir = str(root)
  c.dataset.text_key = 'body'
  return c


def _with(config, **dataset):
  c = config.copy_and_resolve_references()
  c.dataset.update(dataset)
  return c


def _error(config, split='train', **dataset) -> str:
  with pytest.raises(ConfigError) as e:
    data.get_source(_with(config, **dataset), split)
  message = str(e.value)
  assert '\n' not in message  # main prints it as one line.
  return message


def test_split_strings(config):
  assert len(data.get_source(config, 'train')) == 12
  assert len(data.get_source(config, 'train[:25%]')) == 3
  assert len(data.get_source(config, 'train[-2:]')) == 2
  assert len(data.get_source(config, 'train[2:5]+validation')) == 6
  assert 'tensorflow' not in sys.modules


def test_missing_or_bad_split(config):
  message = _error(config, split='trian')
  assert "'trian'" in message and 'train (12), validation (3)' in message
  message = _error(_with(config, eval_split='tset'), split='tset')
  assert "config.dataset.eval_split='tset'" in message
  assert 'train[:10' in _error(config, split='train[:10')
  assert 'is empty' in _error(config, split='train[:0]')
  with pytest.raises(ConfigError, match='3 examples, fewer than the 4 processes'):
    data.get_source(config, 'validation', process_index=0, process_count=4)


def test_wrong_text_key(config):
  message = _error(config, text_key='text')
  assert "text_key='text'" in message and "['body', 'number']" in message
  message = _error(config, text_key='number')
  assert 'not text' in message and "'number'" in message


def test_unknown_dataset_names_what_exists(config):
  message = _error(config, name='no_such_dataset')
  assert "'no_such_dataset'" in message and config.dataset.data_dir in message
  assert 'numbered_docs:1.0.0' in message  # What is prepared there.
  assert 'shakespeare, text_files' in message


def test_unprepared_tfds_dataset_is_not_downloaded(config, tmp_path):
  message = _error(config, name='lm1b', data_dir=str(tmp_path))
  assert "'lm1b' is not prepared in" in message and str(tmp_path) in message
  assert (f'tfds build lm1b --data_dir={tmp_path} --file_format=array_record'
          in message)
  assert not list(tmp_path.glob('lm1b/*/*'))  # Nothing was downloaded.
  # Another version prepared there is named.
  (tmp_path / 'lm1b' / '0.9.0').mkdir(parents=True)
  (tmp_path / 'lm1b' / '0.9.0' / 'dataset_info.json').write_text('{}')
  assert 'found: lm1b:0.9.0' in _error(config, name='lm1b', data_dir=str(tmp_path))
  assert 'tensorflow' not in sys.modules


def test_dataset_stored_as_tfrecord(config, tmp_path):
  src = epath.Path(config.dataset.data_dir) / 'numbered_docs'
  shutil.copytree(src, tmp_path / 'numbered_docs')
  info = tmp_path / 'numbered_docs' / '1.0.0' / 'dataset_info.json'
  record = json.loads(info.read_text())
  record['fileFormat'] = 'tfrecord'
  info.write_text(json.dumps(record))
  message = _error(config, data_dir=str(tmp_path))
  assert 'stored as tfrecord' in message and 'convert_format' in message


# --- text_files: a folder of the user's own text ---------------------------


def _write(root, files: dict):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _texts(c) -> dict:
  """split -> {source: text}."""
  out = {}
  for split in ('train', 'validation'):
    source = data.get_source(c, split)
    out[split] = {source[i]['source'].decode(): source[i][c.dataset.text_key].decode()
                  for i in range(len(source))}
  return out


@pytest.fixture
def files_config(tmp_path):
  c = default.get_config()
  c.dataset.name = 'text_files'
  c.dataset.data_dir = str(tmp_path / 'tfds')
  c.dataset.files = str(tmp_path / 'corpus')
  return c


def test_text_files_reads_a_folder_of_documents(files_config, tmp_path):
  corpus = tmp_path / 'corpus'
  _write(corpus, {
      'a.txt': 'Alpha.\n\nStill alpha.\n',
      'b.md': '# Beta\n\nSome *markdown*.',
      'sub/c.jsonl': '{"text": "gamma one"}\n\n{"text": "gamma two\u2028", "id": 7}\n'
                     '"delta as a bare string"\n{"text": "   "}\n',
      'blank.txt': '  \n',
      'notes.csv': 'ignored,in,a,folder\n',
  })
  split = _texts(files_config)
  everything = split['train'] | split['validation']
  assert everything == {
      f'{corpus}/a.txt': 'Alpha.\n\nStill alpha.\n',
      f'{corpus}/b.md': '# Beta\n\nSome *markdown*.',
      f'{corpus}/sub/c.jsonl:1': 'gamma one',
      f'{corpus}/sub/c.jsonl:3': 'gamma two\u2028',  # Not a line break.
      f'{corpus}/sub/c.jsonl:4': 'delta as a bare string',
  }
  # Fewer than files_eval_every documents: the last one is held out.
  assert list(split['validation']) == [f'{corpus}/sub/c.jsonl:4']
  # A glob, and a comma-separated list, select the same way.
  glob = _with(files_config, files=f'{corpus}/*.txt, {corpus}/**/*.jsonl')
  assert set(_texts(glob)['train']) == {f'{corpus}/a.txt', f'{corpus}/sub/c.jsonl:1',
                                        f'{corpus}/sub/c.jsonl:3'}
  assert 'tensorflow' not in sys.modules


def test_text_files_holds_out_every_nth_document(files_config, tmp_path):
  _write(tmp_path / 'corpus', {f'{i:02d}.txt': f'text {i}' for i in range(25)})
  split = _texts(_with(files_config, files_eval_every=5))
  held_out = sorted(os.path.basename(s) for s in split['validation'])
  assert held_out == ['04.txt', '09.txt', '14.txt', '19.txt', '24.txt']
  assert len(split['train']) == 20


def test_text_files_prepares_again_when_files_change(files_config, tmp_path):
  _write(tmp_path / 'corpus', {'a.txt': 'first', 'b.txt': 'second'})
  assert set(_texts(files_config)['train'].values()) == {'first'}
  _write(tmp_path / 'corpus', {'a.txt': 'changed!'})
  assert set(_texts(files_config)['train'].values()) == {'changed!'}
  prepared = list((tmp_path / 'tfds' / 'text_files').iterdir())
  assert len(prepared) == 2  # One copy per version of the files.


@pytest.mark.parametrize('files, expected', [
    ({}, 'matches no files'),
    ({'a.txt': '', 'b.md': ''}, 'matches 2 files, all of them empty'),
    ({'a.txt': ' \n', 'b.txt': '\n\n'}, 'all 2 files are blank'),
    ({'a.txt': 'only one document'}, 'gives 1 document; text_files needs at least 2'),
    ({'a.jsonl': '{"text": "x"}\n{"body": "y"}\n'},
     r"text_key='text' is not a field of .*a.jsonl:2; its fields: \['body'\]"),
    ({'a.jsonl': '{"text": "x"}\nnot json\n'}, r'a.jsonl:2 is not valid JSON'),
])
def test_text_files_errors(files_config, tmp_path, files, expected):
  (tmp_path / 'corpus').mkdir()
  _write(tmp_path / 'corpus', files)
  with pytest.raises(ConfigError, match=expected) as e:
    data.get_source(files_config, 'train')
  assert '\n' not in str(e.value)


def test_text_files_rejects_other_file_types(files_config, tmp_path):
  _write(tmp_path / 'corpus', {'a.csv': 'x', 'b.txt': 'y'})
  with pytest.raises(ConfigError, match=r"unsupported types \['.csv'\]"):
    data.get_source(_with(files_config, files=str(tmp_path / 'corpus/*')), 'train')


def test_text_files_end_to_end(files_config, tmp_path):
  """A tokenizer trained on the user's files, and packed batches from them."""
  words = ['pretrain', 'on', 'your', 'own', 'text', 'with', 'no', 'code', 'at',
           'all', 'just', 'a', 'folder', 'of', 'files']
  rng = np.random.default_rng(0)
  _write(tmp_path / 'corpus', {
      f'{i}.md': ' '.join(rng.choice(words, 300)) + '\n' for i in range(30)})
  c = files_config
  c.model.vocab_size = 384
  c.tokenizer.vocab_size = 300
  c.seq_len = 64
  tok = data.get_tokenizer(c, str(tmp_path / 'workdir'))
  assert tok.vocab_size == 300
  data.check_vocab(c, tok)
  it = data.make_train_iterator(c, tok, local_batch_size=2, process_index=0,
                                process_count=1)
  batch = next(it)
  it.close()
  assert batch['inputs'].shape == (2, 64) and batch['weights'].sum() > 100
  assert 'pretrain' in tok.decode(batch['inputs'][0])
  # Too many pieces for the sample: a clear error, not SentencePiece's abort.
  c.tokenizer.vocab_size = 5000
  c.model.vocab_size = 5120
  with pytest.raises(ConfigError, match=r'vocab_size=5000 .*train_max_chars'):
    data.get_tokenizer(c, str(tmp_path / 'other'))
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('key, value, expected', [
    ('dataset.num_workers', -1, 'must be an integer >= 0'),
    ('dataset.read_threads', 0, 'must be an integer >= 1'),
    ('dataset.files_eval_every', 1, 'must be an integer >= 2'),
    ('dataset.train_split', '', 'must be a non-empty string'),
    ('tokenizer.model_type', 'wordpiece', 'one of unigram, bpe'),
    ('tokenizer.vocab_size', 4096, 'must be <= model.vocab_size=2048'),
])
def test_config_values_are_checked(config, key, value, expected):
  c = config.copy_and_resolve_references()
  block, name = key.split('.')
  c[block][name] = value
  with pytest.raises(ConfigError, match=f'config.{key}=.* is invalid: {expected}'):
    data.validate_config(c)
  with pytest.raises(ConfigError, match=expected):
    data.get_source(c, 'train')


def test_prepared_in_lists_datasets(config):
  assert sources.prepared_in(config.dataset.data_dir) == ['numbered_docs:1.0.0']
