"""Token shards on disk: flat arrays of one dtype, written whole or not at
all, and read back as one array per split."""

import functools
import hashlib
import os

import numpy as np


def dtype_for(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 2**16 else "uint32"


class Writer:
  """Documents' tokens, each followed by EOT, into shards
  <root>/<prefix>-NNNN.bin of at most `limit` tokens, each written under a
  temporary name, synced and renamed into place once complete."""

  def __init__(self, root: str, prefix: str, dtype: str, eot: int, limit: int):
    self.root, self.prefix, self.dtype, self.limit = root, prefix, dtype, limit
    self.eot = np.array([eot], dtype)
    self.shards = []  # {"file", "tokens", "sha256"} of the finished ones
    self._buffer, self._buffered, self._file = [], 0, None

  def add(self, ids: np.ndarray) -> None:
    self._buffer += [ids.astype(self.dtype), self.eot]
    self._buffered += len(ids) + 1
    if self._buffered >= 1 << 20:
      self._flush()

  def close(self) -> list[dict]:
    self._flush()
    if self._file:
      self._finish_shard()
    return self.shards

  def _flush(self) -> None:
    data = np.concatenate(self._buffer) if self._buffer else self.eot[:0]
    self._buffer, self._buffered = [], 0
    while data.size:
      if self._file is None:
        self._name = f"{self.prefix}-{len(self.shards):04d}.bin"
        self._path = os.path.join(self.root, self._name)
        self._file = open(self._path + ".tmp", "wb")
        self._hash, self._count = hashlib.sha256(), 0
      part, data = np.split(data, [self.limit - self._count])
      self._file.write(part)
      self._hash.update(part)
      self._count += part.size
      if self._count == self.limit:
        self._finish_shard()

  def _finish_shard(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self._path + ".tmp", self._path)
    self.shards.append({"file": self._name, "tokens": self._count,
                        "sha256": self._hash.hexdigest()})
    self._file = None


class Tokens:
  """A split's shards as one read-only token array; slices may span shards.
  Shards are memory-mapped when first read, at most 256 at a time (a large
  corpus has more shards than a process may keep open)."""

  def __init__(self, files: list[str], dtype: str):
    self._files, self.dtype = list(files), np.dtype(dtype)
    self._ends = np.cumsum([os.path.getsize(f) // self.dtype.itemsize
                            for f in files], dtype=np.int64)
    self.size = int(self._ends[-1]) if files else 0
    self._shard = functools.lru_cache(maxsize=256)(
        lambda i: np.memmap(self._files[i], self.dtype, mode="r"))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, key: slice) -> np.ndarray:
    start, stop, step = key.indices(self.size)
    if step != 1:
      raise IndexError("Tokens only slice contiguously")
    parts = []
    i = int(np.searchsorted(self._ends, start, side="right"))
    while start < stop:
      begin = int(self._ends[i - 1]) if i else 0
      end = min(stop, int(self._ends[i]))
      parts.append(self._shard(i)[start - begin:end - begin])
      start, i = end, i + 1
    return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return self[:].astype(dtype or self.dtype)

  def __reduce__(self):  # pickled by file name, not contents (Grain workers)
    return Tokens, (self._files, self.dtype.str)
