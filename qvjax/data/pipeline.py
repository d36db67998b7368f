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

Attention must stay inside a document: the model attends from position q to
k iff k <= q and segment_ids[q] == segment_ids[k]
(qvjax.attention.base.attention_mask), and the segment ids here change
exactly where a new document ([bos]) starts.

Train order (per data shard; by default one shard per host, see
`host_shards`): the shard's block of the train split
(`tfds.split_for_jax_process` semantics), shuffled with config.seed and
repeated forever; epoch e is a fresh permutation (grain shuffles with seed
+ e), every document is seen exactly once per epoch, and packing runs across
the epoch boundary. The run length is config.num_train_steps, not epochs.
Eval order: the eval split in its stored order, never shuffled: the same
rows for every evaluation, every run and any host count.
"""

import itertools

from absl import flags
import grain
import ml_collections
import numpy as np

from qvjax.config import ConfigError
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
  # Threads read and tokenise documents ahead, in order.
  rows = docs.to_iter_dataset(grain.ReadOptions(
      num_threads=config.dataset.read_threads,
      prefetch_buffer_size=config.dataset.read_prefetch))
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


def train_documents(config: ml_collections.ConfigDict, *, shard: int,
                    num_shards: int) -> grain.MapDataset:
  """One shard's train documents, in the order it reads them, forever.

  Element i of epoch e is at index e * n + i, n = the shard's block size.
  """
  source = sources.get_source(config, config.dataset.train_split,
                              process_index=shard, process_count=num_shards)
  docs = grain.MapDataset.source(source)
  if config.dataset.shuffle:
    docs = docs.shuffle(seed=config.seed)  # Seed + epoch: new order per epoch.
  return docs.repeat()


def host_shards(config: ml_collections.ConfigDict, process_index: int,
                process_count: int) -> list[int]:
  """The data shards this host reads. dataset.num_shards = 0: one per host
  (each host its own block). A fixed num_shards S (a multiple of the host
  count) makes the global batches independent of the host count: each
  global batch takes the same rows from each of the S shard streams, and
  host p reads shards p, p + P, ... ."""
  num_shards = config.dataset.num_shards or process_count
  if num_shards % process_count:
    raise ConfigError(f'config.dataset.num_shards={num_shards} is invalid: must be a '
                      f'multiple of the {process_count} processes')
  return list(range(process_index, num_shards, process_count))


def _ensure_absl_flags() -> None:
  """grain's multiprocessing reads its absl flags. Under absl's app.run
  (qvjax.main, qvjax.data.bench) they are parsed; elsewhere (tests, a
  notebook) take their defaults, as app.run would with no arguments."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(config: ml_collections.ConfigDict,
                        tokenizer: Tokenizer, *, local_batch_size: int,
                        process_index: int, process_count: int):
  """An endless, checkpointable grain iterator of this host's train batches.

  Documents: `train_documents`. Batches are prepared ahead: by
  config.dataset.num_workers processes (each packs its own slice of the
  documents; the batch order depends on num_workers, so keep it when
  resuming) with config.dataset.prefetch batches each, or with no workers by
  one background thread keeping config.dataset.prefetch batches ready.
  Save/restore the iterator with `get_state`/`set_state`, or in orbax with
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`; a restored
  iterator yields exactly the batches the saved one would have. Call
  `close()` when done (it stops worker processes).
  """
  shards = host_shards(config, process_index, process_count)
  num_shards = config.dataset.num_shards or process_count
  if local_batch_size % len(shards):
    raise ConfigError(f'config.dataset.num_shards={num_shards} is invalid: each host\'s '
                      f'{len(shards)} shards must divide its {local_batch_size} rows')
  streams = [_packed(train_documents(config, shard=s, num_shards=num_shards), tokenizer,
                     config) for s in shards]
  # Round-robin over the host's shards: each batch takes the same number of
  # rows from each, so a global batch is the same set of rows for any P.
  rows = streams[0] if len(streams) == 1 else grain.experimental.InterleaveIterDataset(
      streams, cycle_length=len(streams))
  batches = rows.batch(local_batch_size, drop_remainder=True).map(to_model_batch)
  d = config.dataset
  if d.num_workers > 0:
    _ensure_absl_flags()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.num_workers, per_worker_buffer_size=max(d.prefetch, 1)))
  elif d.prefetch > 0:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=d.prefetch)
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
