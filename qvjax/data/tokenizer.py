"""SentencePiece vocabulary: loaded from a path, or trained once per workdir.

Training on the fly keeps the default setup self-contained (no vocabulary
file to ship) while a workdir stays reproducible: the model is written once to
<workdir>/tokenizer/spm.model and every later call, or a resumed run, loads it.

Ids: pad=0, unk=1, bos=2, eos=3 (pad=0 so zero-filled rows are padding).
Text round-trips exactly: identity normalisation keeps every space,
'\n' is a piece of its own (plays are line-structured) and byte fallback
encodes any character the vocabulary lacks.
"""

import dataclasses
import io
import time
import uuid

from etils import epath
import jax
import ml_collections
import sentencepiece as spm

from qvjax.data import sources

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WAIT_TIMEOUT_S = 1800.0
_POLL_S = 2.0


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


def load(path: str) -> Tokenizer:
  model = epath.Path(path).read_bytes()  # epath: also gs:// and friends.
  return Tokenizer(spm.SentencePieceProcessor(model_proto=model), str(path))


def _training_lines(config: ml_collections.ConfigDict):
  """Lines of the first train_max_chars chars of the train split, in order.

  The stored order is TFDS's fixed shuffle, so a prefix mixes many plays.
  """
  source = sources.get_source(config, config.dataset.train_split)
  budget = config.tokenizer.train_max_chars
  for i in range(len(source)):
    text = source[i][config.dataset.text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    text = text[:budget]
    budget -= len(text)
    yield from (line for line in text.split('\n') if line.strip())
    if budget <= 0:
      return


def train(config: ml_collections.ConfigDict) -> bytes:
  """Trains a model on the train split; returns the serialized model.

  One thread: SentencePiece output depends on the thread count, and a fixed
  input order with one thread gives the same model on every machine.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(config),
      model_writer=model,
      model_type=config.tokenizer.model_type,
      vocab_size=config.model.vocab_size,
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
  return model.getvalue()


def _wait_for(path: epath.Path) -> None:
  deadline = time.monotonic() + WAIT_TIMEOUT_S
  while not path.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(
          f'Process {jax.process_index()} waited {WAIT_TIMEOUT_S:.0f}s for'
          f' process 0 to write the tokenizer {path}.'
      )
    time.sleep(_POLL_S)


def get_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """Loads config.tokenizer.path, else <workdir>/tokenizer/spm.model.

  If neither exists, process 0 trains one and renames it into place (so no
  process ever reads a half-written file); the others wait for it.
  """
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
