"""Grain pipelines of token windows: (batch, seq_len + 1) int32 arrays.

Window i is tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are its first
seq_len tokens and targets its last seq_len (the inputs shifted by one).

The training order is a pure function of (seed, step, row): the windows are
shuffled by the seed and reshuffled each epoch, and the global batch of step s
is the windows [(s - 1) * batch, s * batch) of that endless order. Grain's
MapDataset is random access, so a pipeline starts at any step: a resumed run
or a cooldown branch starts its pipeline at its checkpoint's step, whatever
its number of processes, devices or worker processes (`num_workers`), and
sees the batches a run that never stopped would have seen. Each process loads
only the rows of the global batch that its devices hold.

Each batch can carry a fingerprint of the whole global batch (the data-order
audit, trainer.audit), computed where the batch is assembled: in Grain's
prefetch threads or worker processes, off the step's critical path. The
process that computes it (process 0 of a run) reads the whole global batch.
"""

import hashlib

from absl import flags
import grain
import numpy as np

from data.corpus import DataError


class WindowSource:
  """Random access to the windows of a flat token array.
  With `vocab_size`, a window holding an id outside the vocabulary (damaged
  or mismatched data, which the embedding lookup would silently clamp) is
  refused."""

  def __init__(self, tokens: np.ndarray, seq_len: int, name: str,
               vocab_size: int = 0):
    self.tokens, self.seq_len, self.name = tokens, seq_len, name
    self.vocab_size = vocab_size

  def __len__(self) -> int:
    return max(0, (len(self.tokens) - 1) // self.seq_len)

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    window = np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)
    self._check_ids(window, start)
    return window

  def check_all_ids(self, max_tokens: int = 2**26) -> None:
    """Checks every id now, before training starts, if the split has at most
    `max_tokens` (larger ones are checked window by window as read)."""
    if len(self.tokens) <= max_tokens:
      self._check_ids(np.asarray(self.tokens), 0)

  def _check_ids(self, tokens: np.ndarray, start: int) -> None:
    if self.vocab_size and tokens.max(initial=0) >= self.vocab_size:
      raise DataError(
          f"the {self.name} split holds token id {tokens.max()} (at token "
          f"{start + int(tokens.argmax())}), outside the model's vocabulary of "
          f"{self.vocab_size}; the data does not match its tokenizer: prepare "
          "it again")

  def __repr__(self) -> str:  # short: it names the split, not its tokens
    return f"WindowSource({self.name}, seq_len={self.seq_len})"


def check_size(source: WindowSource, batch_size: int) -> None:
  if len(source) < batch_size:
    raise DataError(
        f"the {source.name} split has {len(source)} windows of "
        f"{source.seq_len + 1} tokens, fewer than one batch of {batch_size}; "
        "use more text or a smaller batch size / model.seq_len")


def window_ids(num_windows: int, global_batch: int,
               seed: int) -> grain.MapDataset:
  """The window ids of every step's global batch: element k is step k + 1's.
  Batches run across epoch boundaries: no window is dropped."""
  return (grain.MapDataset.range(num_windows).shuffle(seed=seed).repeat()
          .batch(global_batch, drop_remainder=True))


def epoch_of(step: int, global_batch: int, num_windows: int) -> int:
  """The epoch (from 0) of step `step`'s first window."""
  return (step - 1) * global_batch // num_windows


def fingerprint(tokens: np.ndarray) -> str:
  """A short hash of a batch's token ids (blake2b of their int32 bytes)."""
  data = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
  return hashlib.blake2b(data, digest_size=8).hexdigest()


def train_iterator(source: WindowSource, global_batch: int, seed: int,
                   start_step: int = 0, rows: slice = slice(None),
                   num_workers: int = 0, fingerprints: bool = False):
  """An endless iterator of (tokens, fingerprint) for steps start_step + 1,
  start_step + 2, ...: tokens are `rows` of the step's global batch
  ([rows, L+1] int32), fingerprint that of the whole global batch (read in
  full for it) with `fingerprints`, else None."""
  def load(ids):
    if not fingerprints:
      return np.stack([source[i] for i in ids[rows]]), None
    tokens = np.stack([source[i] for i in ids])
    return tokens[rows], fingerprint(tokens)

  ds = window_ids(len(source), global_batch, seed)[start_step:].map(load)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                            prefetch_buffer_size=4))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags
      flags.FLAGS.mark_as_parsed()
    # Batches cross from the workers pickled, not in shared memory: Grain
    # unlinks a shared block only once its array is garbage-collected (in a
    # background thread), and the last batch's block, which the jax.Array
    # made from it on CPU aliases without a copy, is collected only as the
    # interpreter exits: too late ("leaked shared_memory objects" at exit).
    # A batch is small next to a step.
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(min_shm_size=2**62))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def eval_batches(source: WindowSource, batch_size: int, max_batches: int = 0):
  """Every window once, in order, as (tokens [b, L+1], mask [b]); the last
  batch is padded with masked-out windows so nothing is dropped."""
  n = len(source)
  starts = range(0, n, batch_size)
  if max_batches > 0:
    starts = starts[:max_batches]
  for s in starts:
    count = min(batch_size, n - s)
    tokens = np.zeros((batch_size, source.seq_len + 1), np.int32)
    tokens[:count] = np.stack([source[i] for i in range(s, s + count)])
    yield tokens, np.arange(batch_size) < count
