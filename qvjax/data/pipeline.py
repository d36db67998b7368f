"""From documents to packed token batches, with grain.

Every document becomes [bos] + ids + [eos] (tokenised once per visit) and
documents are concatenated, then split into rows of seq_len + 1 tokens
(`grain.experimental.ConcatThenSplitIterDataset`): no token is wasted on
padding in training and a long document simply continues in the next row,
as a new segment whose positions restart at 0 (so positions stay below
seq_len, whatever the position scheme). A row of seq_len + 1 tokens gives
seq_len inputs and their seq_len next-token targets.

Batch dict, every array of shape (local_batch_size, seq_len):
  inputs, targets  int32  row[:-1], row[1:]
  segment_ids      int32  1, 2, 3, ... per document in the row; 0 = padding
  positions        int32  0, 1, 2, ... from each segment's start
  weights        float32  1 where the target is the next token of the same
                          document, 0 across a document boundary and on
                          padding (the loss mask)
"""

import itertools

import grain
import ml_collections
import numpy as np

from qvjax.data import sources
from qvjax.data.tokenizer import Tokenizer


class _Tokenize(grain.transforms.Map):
  """A source example -> {'tokens': [bos] + ids + [eos]} as int32."""

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def map(self, example):
    text = example[self._text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    tok = self._tokenizer
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    return {'tokens': np.asarray(ids, np.int32)}


def _packed(docs: grain.MapDataset, tokenizer, config) -> grain.IterDataset:
  """Tokenised, packed rows of seq_len + 1 tokens (+ segment ids, positions)."""
  docs = docs.map(_Tokenize(tokenizer, config.dataset.text_key))
  # Few threads: tokenising a document takes well under a millisecond.
  rows = docs.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                prefetch_buffer_size=32))
  return grain.experimental.ConcatThenSplitIterDataset(
      rows, length_struct={'tokens': config.seq_len + 1})


def to_model_batch(rows: dict) -> dict:
  """Stacked packed rows (B, seq_len + 1) -> the batch dict (B, seq_len)."""
  tokens, seg = rows['tokens'], rows['tokens_segment_ids']
  same_doc = (seg[:, :-1] != 0) & (seg[:, :-1] == seg[:, 1:])
  return {
      'inputs': tokens[:, :-1].astype(np.int32),
      'targets': tokens[:, 1:].astype(np.int32),
      'segment_ids': seg[:, :-1].astype(np.int32),
      'positions': rows['tokens_positions'][:, :-1].astype(np.int32),
      'weights': same_doc.astype(np.float32),
  }


def make_train_iterator(config: ml_collections.ConfigDict,
                        tokenizer: Tokenizer, *, local_batch_size: int,
                        process_index: int, process_count: int):
  """An endless, checkpointable grain iterator of this host's train batches.

  Hosts take disjoint documents, `source[process_index::process_count]`;
  each shuffles its shard with config.seed, and grain reseeds every epoch.
  Save/restore the iterator with `get_state`/`set_state`, or in orbax with
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
  """
  source = sources.get_source(config, config.dataset.train_split)
  docs = grain.MapDataset.source(source)[process_index::process_count]
  if config.dataset.shuffle:
    docs = docs.shuffle(seed=config.seed)
  docs = docs.repeat()  # Forever; each epoch in a new order.
  batches = _packed(docs, tokenizer, config).batch(
      local_batch_size, drop_remainder=True).map(to_model_batch)
  if config.dataset.num_workers > 0:
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.dataset.num_workers))
  return iter(batches)


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                      *, local_batch_size: int, num_batches: int,
                      process_index: int, process_count: int) -> list[dict]:
  """This host's share of the first num_batches global eval batches.

  The eval split is read in its stored order and packed into global batches
  of local_batch_size * process_count rows; this host gets its contiguous
  block of rows of each. So every host returns the same number of batches
  (fewer than num_batches only if the split runs out; the last one is padded
  with weight-0 rows), and the evaluated tokens do not depend on the host
  count.
  """
  source = sources.get_source(config, config.dataset.eval_split)
  if len(source) == 0:
    raise ValueError(f'Eval split {config.dataset.eval_split!r} is empty.')
  global_size = local_batch_size * process_count
  rows = _packed(grain.MapDataset.source(source), tokenizer, config)
  batches = []
  for batch in itertools.islice(rows.batch(global_size), num_batches):
    short = global_size - len(batch['tokens'])
    batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
    mine = slice(process_index * local_batch_size,
                 (process_index + 1) * local_batch_size)
    batches.append(to_model_batch({k: v[mine] for k, v in batch.items()}))
  return batches
