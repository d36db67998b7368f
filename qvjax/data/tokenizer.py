"""SentencePiece vocabulary: loaded from a path, or trained once per workdir.

Training on the fly keeps the default setup self-contained (no vocabulary
file to ship) while a workdir stays reproducible: the model is written once to
<workdir>/tokenizer/spm.model and every later call, or a resumed run, loads it.
config.tokenizer.path (local or gs://) loads a given model instead.

Sizes: the tokenizer has config.tokenizer.vocab_size pieces (0: as many as
config.model.vocab_size). The model's vocab_size may be larger, padded to a
multiple that shards well (128, or the tensor axis); ids at or above
`Tokenizer.vocab_size` never occur in the data. `check_vocab` checks this;
`tokenizer_fingerprint` / `check_tokenizer` record a tokenizer with a
checkpoint and refuse to resume with another one.

Ids: pad=0, unk=1, bos=2, eos=3 (pad=0 so zero-filled rows are padding).
Text round-trips exactly: identity normalisation keeps every space,
'\n' is a piece of its own (plays are line-structured) and byte fallback
encodes any character the vocabulary lacks.
"""

import dataclasses
import functools
import hashlib
import io
import uuid

from etils import epath
import jax
import ml_collections
import sentencepiece as spm

from qvjax.config import ConfigError
from qvjax.data import options
from qvjax.data import sources

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WAIT_TIMEOUT_S = 1800.0
_POLL_S = 2.0
# SentencePiece skips training lines over 4192 bytes; cut them into pieces
# of at most this many characters (4 UTF-8 bytes each at worst).
_MAX_LINE_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A loaded SentencePiece model and where it came from."""

  processor: spm.SentencePieceProcessor
  path: str

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self.processor.pad_id()

  @property
  def bos_id(self) -> int:
    return self.processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self.processor.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def decode(self, ids) -> str:
    return self.processor.decode([int(i) for i in ids])

  @functools.cached_property
  def sha256(self) -> str:
    """Of the serialized model proto: the vocabulary's identity."""
    proto = self.processor.serialized_model_proto()
    return hashlib.sha256(proto).hexdigest()


def tokenizer_vocab_size(config: ml_collections.ConfigDict) -> int:
  """Pieces of a tokenizer trained for `config`: config.tokenizer.vocab_size,
  or config.model.vocab_size when that is 0."""
  return config.tokenizer.vocab_size or config.model.vocab_size


def load(path: str) -> Tokenizer:
  try:
    model = epath.Path(path).read_bytes()  # epath: also gs:// (with gcsfs).
  except FileNotFoundError as e:
    raise ConfigError(f'config.tokenizer.path={path!r} is invalid: file not'
                      ' found (leave empty to train one into the workdir)') from e
  except ImportError as e:
    raise ConfigError(f'config.tokenizer.path={path!r} needs gcsfs to read'
                      f" gs:// (pip install 'qvjax[gcs]'): {e}") from e
  try:
    processor = spm.SentencePieceProcessor(model_proto=model)
  except Exception as e:  # pylint: disable=broad-except  (RuntimeError, mostly)
    raise ConfigError(f'config.tokenizer.path={path!r} is invalid: not a'
                      f' SentencePiece model ({e})') from e
  return Tokenizer(processor, str(path))


def tokenizer_fingerprint(tok: Tokenizer) -> dict:
  """What a checkpoint records of its tokenizer (JSON-serialisable)."""
  return {'path': tok.path, 'vocab_size': tok.vocab_size, 'sha256': tok.sha256}


def _describe(fingerprint: dict) -> str:
  sha = fingerprint.get('sha256')
  return (f"{fingerprint.get('path', '?')} ({fingerprint.get('vocab_size', '?')}"
          f" pieces{f', sha256 {sha[:12]}' if sha else ''})")


def check_tokenizer(recorded, tok: Tokenizer) -> None:
  """Raises ConfigError unless `tok` is the tokenizer `recorded` describes.

  `recorded` is a `tokenizer_fingerprint` dict (a bare path string, as older
  checkpoints stored, is accepted and then only the vocab size, if given,
  can be checked). The same model proto under another path passes: a copied
  tokenizer is the same tokenizer.
  """
  if isinstance(recorded, str):
    recorded = {'path': recorded}
  recorded = {k: v for k, v in recorded.items() if v is not None}  # Unknown.
  now = tokenizer_fingerprint(tok)
  same = (recorded.get('sha256', now['sha256']) == now['sha256'] and
          recorded.get('vocab_size', now['vocab_size']) == now['vocab_size'])
  if not same:
    raise ConfigError(
        f'config.tokenizer.path={tok.path!r} is invalid for this checkpoint:'
        f' it was trained with the tokenizer {_describe(recorded)}, this run'
        f' loads {_describe(now)}; set config.tokenizer.path to the'
        ' checkpoint\'s tokenizer or use a fresh --workdir')


def check_vocab(config: ml_collections.ConfigDict, tok: Tokenizer) -> None:
  """Raises ConfigError if the tokenizer does not fit the config: more pieces
  than config.model.vocab_size, or not config.tokenizer.vocab_size (if set)."""
  want = config.tokenizer.vocab_size
  if want and tok.vocab_size != want:
    raise ConfigError(
        f'config.tokenizer.vocab_size={want} is invalid: the tokenizer at'
        f' {tok.path} has {tok.vocab_size} pieces (0 takes its size)')
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(
        f'config.model.vocab_size={config.model.vocab_size} is invalid: the'
        f' tokenizer at {tok.path} has {tok.vocab_size} pieces; the model needs'
        ' at least as many (round up to a multiple of 128 to shard well)')


def _training_lines(config: ml_collections.ConfigDict, source):
  """Lines of the first train_max_chars chars of the train split, in order.

  The stored order is TFDS's fixed shuffle, so a prefix mixes many documents
  (many plays, for Shakespeare).
  """
  budget = config.tokenizer.train_max_chars
  for i in range(len(source)):
    text = source[i][config.dataset.text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    text = text[:budget]
    budget -= len(text)
    for line in text.split('\n'):
      if line.strip():
        yield from _pieces(line)
    if budget <= 0:
      return


def _pieces(line: str):
  """`line` in pieces of at most _MAX_LINE_CHARS, cut after a space if any."""
  while len(line) > _MAX_LINE_CHARS:
    cut = line.rfind(' ', 0, _MAX_LINE_CHARS) + 1 or _MAX_LINE_CHARS
    yield line[:cut]
    line = line[cut:]
  if line:
    yield line


def train(config: ml_collections.ConfigDict) -> bytes:
  """Trains a model on the train split; returns the serialized model.

  One thread: SentencePiece output depends on the thread count, and a fixed
  input order with one thread gives the same model on every machine.
  """
  # Opened first, so that dataset mistakes surface as they are.
  source = sources.get_source(config, config.dataset.train_split)
  model = io.BytesIO()
  size = tokenizer_vocab_size(config)
  try:
    _train(_training_lines(config, source), config, model, size)
  except RuntimeError as e:  # SentencePiece's own checks, e.g. size too high.
    raise ConfigError(
        f'config.tokenizer.vocab_size={size} (0 = model.vocab_size) cannot be'
        f' trained from {config.tokenizer.train_max_chars} characters of'
        f' {config.dataset.name!r} {config.dataset.train_split!r}:'
        f' {str(e).strip().splitlines()[-1]}; lower the vocab size or raise'
        ' config.tokenizer.train_max_chars') from e
  return model.getvalue()


def _train(lines, config, model: io.BytesIO, size: int) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines,
      model_writer=model,
      model_type=config.tokenizer.model_type,
      vocab_size=size,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=['\n'],
      byte_fallback=True,
      character_coverage=0.9995,  # Rare characters fall back to bytes.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,  # Words after '\n' look like line starts.
      input_sentence_size=0,  # Use every line given, in order.
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )


def _wait_for(path: epath.Path) -> None:
  sources.wait_until_exists(path, f'write the tokenizer {path}', WAIT_TIMEOUT_S, _POLL_S)


def get_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """Loads config.tokenizer.path, else <workdir>/tokenizer/spm.model.

  If neither exists, process 0 trains one and renames it into place (so no
  process ever reads a half-written file); the others wait for it.
  """
  options.validate_config(config)
  if config.tokenizer.path:
    return load(config.tokenizer.path)
  path = epath.Path(workdir) / 'tokenizer' / 'spm.model'
  if not path.exists():
    if jax.process_index() == 0:
      model = train(config)
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / f'.spm.model.tmp-{uuid.uuid4().hex}'
      tmp.write_bytes(model)
      tmp.rename(path)
    else:
      _wait_for(path)
  return load(str(path))
