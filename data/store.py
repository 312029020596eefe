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
from typing import Sequence

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
  out, or if its file has the bytes of such a file (a copy under another
  name); else train. Without one: val if a hash of the document's bytes
  falls below val_fraction. Neither depends on file order or worker count."""
  holdout: tuple[str, ...] = ()
  val_fraction: float = 0.01
  copies: frozenset[str] = frozenset()  # paths of copies of held-out files

  @classmethod
  def of_files(cls, files: Sequence[str], holdout: Sequence[str],
               val_fraction: float) -> "Splitter":
    """The splitter of a preparation of `files`, knowing which of them copy
    a held-out file."""
    held = [f for f in files if corpus.name(f) in holdout]
    sizes = {os.path.getsize(f) for f in held}
    digests = {_file_digest(f) for f in held}
    return cls(tuple(holdout), val_fraction, frozenset(
        f for f in files if f not in held and os.path.getsize(f) in sizes
        and _file_digest(f) in digests))

  def of(self, path: str, data: bytes) -> str:
    if self.holdout:
      held = corpus.name(path) in self.holdout or path in self.copies
      return "val" if held else "train"
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    return "val" if h < self.val_fraction * 2**64 else "train"

  def settings(self):
    """What a document's split depends on, for the keys of prepared work."""
    if self.copies:
      return [list(self.holdout), sorted(self.copies)]
    return list(self.holdout) or self.val_fraction


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


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
