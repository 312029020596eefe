"""What a prepared directory of either kind (prepare.py's token shards,
examples.py's examples) is made with: its meta.json (written whole: data.disk);
one preparation of it at a time; the split of a document; the key of its
inputs."""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from typing import Iterable

from data import corpus

SPLITS = ("train", "val")
META = "meta.json"
LOCK = ".lock"  # also marks a directory as one that prepare.build wrote


def file_identity(piece: corpus.Piece) -> list:
  stat = os.stat(piece.path)
  return [piece.path, piece.start, piece.end, stat.st_size, stat.st_mtime_ns]


def digest(*parts) -> str:
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Splitter:
  """The split of a document. With a holdout: val if its file's name
  (corpus.name: the file name without extensions, in any folder) is held
  out, or if its bytes are those of a held-out document (a copy under
  another name); else train. Without one: val if a hash of its bytes falls
  below val_fraction. Neither depends on file order or worker count."""
  holdout: tuple[str, ...] = ()
  val_fraction: float = 0.01
  held: frozenset[str] = frozenset()  # digests of the held-out documents

  def holding(self, documents: Iterable[bytes]) -> "Splitter":
    """This splitter knowing the held-out documents, so that their copies
    are held out too."""
    return dataclasses.replace(
        self, held=frozenset(_blake(d).hex() for d in documents))

  def of(self, name: str, data: bytes) -> str:
    if self.holdout:
      held = name in self.holdout or _blake(data).hex() in self.held
      return "val" if held else "train"
    h = int.from_bytes(_blake(data), "big")
    return "val" if h < self.val_fraction * 2**64 else "train"

  def settings(self):
    """What a document's split depends on, for the keys of prepared work."""
    if self.holdout:
      return [list(self.holdout), digest(sorted(self.held))]
    return self.val_fraction


def _blake(data: bytes) -> bytes:
  return hashlib.blake2b(data, digest_size=8).digest()


@contextlib.contextmanager
def locked(output: str):
  """One preparation of a directory at a time (others wait)."""
  with open(os.path.join(output, LOCK), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
