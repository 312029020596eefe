"""Grain pipelines of token windows: (batch, seq_len + 1) int32 arrays.

Window i is tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are its first
seq_len tokens and targets its last seq_len (the inputs shifted by one).

The training order is a pure function of (seed, step, row): each epoch
shuffles the windows anew, seeded by a hash of (seed, epoch), and the global
batch of step s is the windows [(s - 1) * batch, s * batch) of that endless
order. Grain's MapDataset is random access, so a pipeline starts at any step:
a resumed run or a cooldown branch starts its pipeline at its checkpoint's step, whatever
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

  unit = "windows"

  def describe(self) -> str:
    return f"{len(self):,} windows"


def source_for(config, data, split: str, pad_id: int, vocab_size: int = 0):
  """The items of a split that a run's batches are made of, by its
  train.objective: text windows (next-token; `data` a prepare.Prepared),
  packed examples (sft) or preference pairs (dpo; `data` an
  examples.Prepared). `pad_id` pads examples (the EOT id)."""
  objective, seq_len = config.train.objective, config.model.seq_len
  if objective == "next-token":
    return WindowSource(data.tokens(split), seq_len, split, vocab_size)
  seqs = data.sequences(split)
  if objective == "dpo":
    return PairSource(seqs, seq_len, split, vocab_size, pad_id=pad_id)
  return PackedSource(seqs, seq_len, split, vocab_size, pad_id=pad_id,
                      seed=config.train.seed if split == "train" else None,
                      pack=config.data.pack, loss_on=config.train.sft_loss_on)


def check_size(source, batch_size: int) -> None:
  if len(source) < batch_size:
    raise DataError(
        f"the {source.name} split has {len(source)} {source.unit} of "
        f"{source.seq_len + 1} tokens, fewer than one batch of {batch_size}; "
        "use more text or a smaller batch size / model.seq_len")


class PackedSource:
  """Whole token sequences (post-training examples, data.examples) packed
  into windows of seq_len + 1 tokens, for SFT. An item is a dict of
  [seq_len + 1] int32 arrays: `tokens` (padded with `pad_id`), `segments`
  (1, 2, ... for the sequences of the window in order, 0 for padding),
  `positions` (restarting at 0 with each sequence) and `weights` (1 where
  the token is a loss target: a response token or the EOT closing one, or
  with loss_on="all" every token but a sequence's first). Inputs are the
  first seq_len of each, targets the tokens shifted by one, as for text.

  Packing is next-fit in a fixed order (the sequences shuffled by `seed`;
  None: as stored): a window takes sequences until the next one does not
  fit; with `pack` False, one sequence per window. A sequence longer than a
  window is cut to its first seq_len + 1 tokens (counted in `truncated`;
  its closing EOT is lost); one left without a target is dropped (counted
  in `dropped`)."""
  unit = "windows"

  def __init__(self, seqs, seq_len: int, name: str, vocab_size: int = 0, *,
               pad_id: int = 0, seed: int | None = None, pack: bool = True,
               loss_on: str = "response"):
    self.seqs, self.seq_len, self.name = seqs, seq_len, name
    self.vocab_size, self.pad_id, self.loss_on = vocab_size, pad_id, loss_on
    window = seq_len + 1
    lengths = seqs.lengths()
    self.kept = np.minimum(lengths, window)
    self.truncated = int((lengths > window).sum())
    if loss_on == "all":
      usable = self.kept >= 2
    else:
      usable = seqs.targets_in_first(self.kept) > 0
    self.dropped = int((~usable).sum())
    order = np.arange(len(seqs)) if seed is None else (
        np.random.default_rng(seed).permutation(len(seqs)))
    self.order = order[usable[order]]
    bounds, fill = [0], 0
    for k, length in enumerate(self.kept[self.order].tolist()):
      if fill and (fill + length > window or not pack):
        bounds.append(k)
        fill = 0
      fill += length
    if len(self.order):
      bounds.append(len(self.order))
    self.bounds = np.array(bounds, np.int64)

  def __len__(self) -> int:
    return len(self.bounds) - 1

  def __getitem__(self, i: int) -> dict:
    window = self.seq_len + 1
    out = {"tokens": np.full(window, self.pad_id, np.int32),
           "segments": np.zeros(window, np.int32),
           "positions": np.zeros(window, np.int32),
           "weights": np.zeros(window, np.int32)}
    pos = 0
    for segment, s in enumerate(self.order[self.bounds[i]:self.bounds[i + 1]],
                                1):
      tokens, targets = self.seqs.get(s)
      n = int(self.kept[s])
      span = slice(pos, pos + n)
      out["tokens"][span] = tokens[:n]
      out["segments"][span] = segment
      out["positions"][span] = np.arange(n)
      out["weights"][span] = targets[:n] if self.loss_on != "all" else 1
      out["weights"][pos] = 0  # nothing predicts a sequence's first token
      pos += n
    return out

  def check_all_ids(self) -> None:
    _check_sequence_ids(self.seqs, self.name, self.vocab_size)

  def describe(self) -> str:
    used = int(self.kept[self.order].sum())
    return (f"{len(self.order):,} sequences in {len(self):,} windows "
            f"({used / max(1, len(self) * (self.seq_len + 1)):.0%} filled), "
            f"{self.truncated:,} truncated to the window, {self.dropped:,} "
            "dropped (no target left)")

  def __repr__(self) -> str:
    return f"PackedSource({self.name}, seq_len={self.seq_len})"


class PairSource:
  """Preference pairs (data.examples, format dpo: chosen and rejected
  sequences stored alternately), one pair per item: a dict of [2, seq_len +
  1] int32 arrays, `tokens` (row 0 the chosen sequence, row 1 the rejected
  one, each from position 0, padded with `pad_id`) and `weights` (1 on the
  response tokens and the closing EOT). A sequence longer than a window is
  cut to its first seq_len + 1 tokens (the pair counted in `truncated`); a
  pair where either side is left without a target is dropped (`dropped`)."""
  unit = "pairs"

  def __init__(self, seqs, seq_len: int, name: str, vocab_size: int = 0, *,
               pad_id: int = 0):
    self.seqs, self.seq_len, self.name = seqs, seq_len, name
    self.vocab_size, self.pad_id = vocab_size, pad_id
    window = seq_len + 1
    lengths = seqs.lengths()
    self.kept = np.minimum(lengths, window)
    self.truncated = int((lengths > window).reshape(-1, 2).any(1).sum())
    usable = (seqs.targets_in_first(self.kept) > 0).reshape(-1, 2).all(1)
    self.dropped = int((~usable).sum())
    self.pairs = np.flatnonzero(usable)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> dict:
    window = self.seq_len + 1
    out = {"tokens": np.full((2, window), self.pad_id, np.int32),
           "weights": np.zeros((2, window), np.int32)}
    for row in range(2):
      s = 2 * int(self.pairs[i]) + row
      tokens, targets = self.seqs.get(s)
      n = int(self.kept[s])
      out["tokens"][row, :n] = tokens[:n]
      out["weights"][row, :n] = targets[:n]
    return out

  def check_all_ids(self) -> None:
    _check_sequence_ids(self.seqs, self.name, self.vocab_size)

  def describe(self) -> str:
    return (f"{len(self):,} pairs, {self.truncated:,} truncated to the "
            f"window, {self.dropped:,} dropped (no target left)")

  def __repr__(self) -> str:
    return f"PairSource({self.name}, seq_len={self.seq_len})"


def _check_sequence_ids(seqs, name: str, vocab_size: int) -> None:
  if vocab_size and seqs.tokens.max(initial=0) >= vocab_size:
    raise DataError(
        f"the {name} split holds token id {seqs.tokens.max()}, outside the "
        f"model's vocabulary of {vocab_size}; the examples do not match the "
        "model's tokenizer: prepare them again")


# The epoch orders' versions (config.data.order_version): 1 seeded epoch e
# of seed s with s + e, so seed s + 1's epoch e was seed s's epoch e + 1; 2
# seeds each epoch with a hash of (seed, epoch), independent across seeds.
ORDER_VERSIONS = (1, 2)


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch (order version 2): 32 bits of a hash of
  (seed, epoch)."""
  digest = hashlib.blake2b(f"{seed},{epoch}".encode(), digest_size=4).digest()
  return int.from_bytes(digest, "little")


def epoch_order(num_windows: int, seed: int,
                order_version: int = 2) -> grain.MapDataset:
  """Every window id, epoch after epoch, each epoch a permutation (Grain's
  index shuffle: random access, no table of the epoch held)."""
  windows = grain.MapDataset.range(num_windows)
  if order_version == 1:
    return windows.shuffle(seed=seed).repeat()
  shuffle = lambda index, _: windows.shuffle(
      seed=epoch_seed(seed, index // num_windows))[index % num_windows]
  return windows.repeat().map_with_index(shuffle)


def window_ids(num_windows: int, global_batch: int, seed: int,
               order_version: int = 2) -> grain.MapDataset:
  """The window ids of every step's global batch: element k is step k + 1's.
  Batches run across epoch boundaries: no window is dropped."""
  return epoch_order(num_windows, seed, order_version).batch(
      global_batch, drop_remainder=True)


def epoch_of(step: int, global_batch: int, num_windows: int) -> int:
  """The epoch (from 0) of step `step`'s first window."""
  return (step - 1) * global_batch // num_windows


def fingerprint(batch) -> str:
  """A short hash of a batch (blake2b of its int32 bytes; a dict's arrays
  in the order of their names)."""
  arrays = [batch[k] for k in sorted(batch)] if isinstance(batch, dict) else [
      batch]
  h = hashlib.blake2b(digest_size=8)
  for array in arrays:
    h.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
  return h.hexdigest()


def stack(items: list):
  """Items of a source (arrays, or dicts of arrays) as one batch."""
  if isinstance(items[0], dict):
    return {k: np.stack([item[k] for item in items]) for k in items[0]}
  return np.stack(items)


def rows_of(batch, rows: slice):
  if isinstance(batch, dict):
    return {k: v[rows] for k, v in batch.items()}
  return batch[rows]


def train_iterator(source: WindowSource, global_batch: int, seed: int,
                   start_step: int = 0, rows: slice = slice(None),
                   num_workers: int = 0, fingerprints: bool = False,
                   order_version: int = 2):
  """An endless iterator of (tokens, fingerprint) for steps start_step + 1,
  start_step + 2, ...: tokens are `rows` of the step's global batch
  ([rows, L+1] int32), fingerprint that of the whole global batch (read in
  full for it) with `fingerprints`, else None."""
  def load(ids):
    if not fingerprints:
      return stack([source[i] for i in ids[rows]]), None
    batch = stack([source[i] for i in ids])
    return rows_of(batch, rows), fingerprint(batch)

  ds = window_ids(len(source), global_batch, seed,
                  order_version)[start_step:].map(load)
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


def eval_ids(num_items: int, max_items: int = 0):
  """The items an eval scores: all (max_items 0), or max_items of them
  spread evenly over the split (a fixed subset, the same at every eval)."""
  if not 0 < max_items < num_items:
    return np.arange(num_items)
  return np.arange(max_items) * num_items // max_items


def eval_batches(source, batch_size: int, max_items: int = 0):
  """The items of eval_ids in order, as (batch, mask [b]): tokens [b, L+1]
  (or a dict of arrays with b rows, as the source's items); the last batch
  is padded with masked-out items (zeros) so nothing is dropped."""
  ids = eval_ids(len(source), max_items)
  for s in range(0, len(ids), batch_size):
    chunk = ids[s:s + batch_size]
    count = len(chunk)
    items = stack([source[i] for i in chunk])
    pad = lambda x: np.concatenate(
        [x, np.zeros((batch_size - count, *x.shape[1:]), x.dtype)])
    batch = ({k: pad(v) for k, v in items.items()} if isinstance(items, dict)
             else pad(items))
    yield batch, np.arange(batch_size) < count
