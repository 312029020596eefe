"""Grain pipelines of token windows: (batch, seq_len + 1) int32 arrays.

Window i is tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are its first
seq_len tokens and targets its last seq_len (the inputs shifted by one).
Training windows are shuffled by the seed, reshuffled each epoch, and batched
globally before each process takes its own rows, so a global batch is the
same whatever the number of processes. The iterator state is checkpointable;
with worker processes (`num_workers`) the batches are the same as without, and
a state restores under the same worker count.
"""

from absl import flags
import grain
import numpy as np

from data.corpus import DataError


class WindowSource:
  """Random access to the windows of a flat token array (a grain source).
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

  def __repr__(self) -> str:  # grain checkpoints need a stable repr
    return f"WindowSource({self.name}, seq_len={self.seq_len})"


def check_size(source: WindowSource, batch_size: int) -> None:
  if len(source) < batch_size:
    raise DataError(
        f"the {source.name} split has {len(source)} windows of "
        f"{source.seq_len + 1} tokens, fewer than one batch of {batch_size}; "
        "use more text or a smaller batch size / model.seq_len")


def train_iterator(source: WindowSource, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   num_workers: int = 0):
  """An endless, checkpointable iterator of this process's [b, L+1] rows."""
  local = global_batch // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  ds = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
        .batch(global_batch, drop_remainder=True)
        .map(lambda idx: np.stack([source[i] for i in idx[rows]])))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                            prefetch_buffer_size=4))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags
      flags.FLAGS.mark_as_parsed()
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
