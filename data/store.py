"""What a prepared directory of either kind (prepare.py's token shards,
examples.py's examples) is made with: its meta.json (written whole: data.disk);
one preparation of it at a time; the split of a document; the key of its
inputs."""

import contextlib
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


def split_of(name: str, data: bytes, holdout: Sequence[str],
             val_fraction: float) -> str:
  """A document's split: by its file's name if there is a holdout, else by
  a hash of its bytes."""
  if holdout:
    return "val" if name in holdout else "train"
  h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
  return "val" if h < val_fraction * 2**64 else "train"


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
