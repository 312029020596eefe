"""Tokenizers: text <-> int ids, each saved as plain JSON with the data."""

import numpy as np


class CharTokenizer:
  """One id per Unicode character seen in the corpus (sorted)."""
  kind = "char"

  def __init__(self, chars: str):
    self.chars = chars
    self._ids = {c: i for i, c in enumerate(chars)}

  @classmethod
  def fit(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.array([self._ids[c] for c in text], np.int32)
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary of "
                       "this character tokenizer") from None

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 length of each token, for exact bits-per-byte."""
    return np.array([len(c.encode("utf-8")) for c in self.chars], np.int32)

  def to_json(self) -> dict:
    return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
  """The 256 byte values of the UTF-8 encoding."""
  kind = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    return np.ones(256, np.int32)

  def to_json(self) -> dict:
    return {"kind": self.kind}


def from_json(spec: dict):
  if spec["kind"] == "char":
    return CharTokenizer(spec["chars"])
  if spec["kind"] == "byte":
    return ByteTokenizer()
  raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")


def fit(kind: str, text: str):
  """A tokenizer of the given kind for this corpus ('char' or 'byte')."""
  if kind == "char":
    return CharTokenizer.fit(text)
  if kind == "byte":
    return ByteTokenizer()
  raise ValueError(f"data.tokenizer={kind!r}; choose 'char' or 'byte'")
