"""Tokenizers: text <-> int ids.

Every tokenizer round-trips text exactly, has an end-of-text id (`eot_id`)
that follows each document in prepared data, and knows the UTF-8 length of
each token (0 for EOT), so bits per byte are exact. Encoding never yields EOT,
even for text that spells "<|endoftext|>"; decoding renders EOT as that string
(char: as "\u2403", the symbol for end of text, so that every id is one
character).

char and byte are described by a small dict stored in meta.json; a byte-level
BPE (trained here, or GPT-2's loaded from local files) by a Hugging Face
tokenizer.json saved next to the data.
"""

import hashlib
import json
import os

import numpy as np
import tokenizers as hf

from data import disk

EOT = "<|endoftext|>"
CHAR_EOT = "\u2403"  # ␃
# What a tokenizer must round-trip exactly, with its UTF-8 byte count.
PROBE = "Hé said:\n\n\t«ﬁne»  — 日本語 🙂👍🏽 <|endoftext|>   \r\n"


class _Tokenizer:

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]


class CharTokenizer(_Tokenizer):
  """One id per Unicode character seen in the corpus (in code-point order),
  then EOT."""
  kind = "char"

  def __init__(self, chars: str):
    # Code points in id order, then one larger than any (for unknown ones).
    self._codes = np.array([ord(c) for c in chars] + [1 << 32], np.int64)
    self.chars = chars + CHAR_EOT  # the text of each id
    self.vocab_size = len(self.chars)
    self.eot_id = len(chars)

  @classmethod
  def fit(cls, texts) -> "CharTokenizer":
    seen = set()
    for text in texts:
      seen.update(text)
    return cls("".join(sorted(seen)))

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    ids = np.searchsorted(self._codes, codes)
    unknown = np.flatnonzero(self._codes[ids] != codes)
    if unknown.size:
      raise ValueError(f"character {text[unknown[0]]!r} is not in the "
                       "vocabulary of this character tokenizer")
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 length of each token, for exact bits-per-byte (EOT: 0)."""
    return np.array([len(c.encode("utf-8")) for c in self.chars[:-1]] + [0],
                    np.int32)

  def to_json(self) -> dict:
    return {"kind": self.kind, "chars": self.chars[:-1]}


class ByteTokenizer(_Tokenizer):
  """The 256 byte values of the UTF-8 encoding, then EOT (id 256)."""
  kind = "byte"
  vocab_size = 257
  eot_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Invalid UTF-8 (a sample cut mid-character) decodes to U+FFFD."""
    ids = np.asarray(ids, np.int64)
    parts = np.split(ids, np.flatnonzero(ids == self.eot_id))
    return EOT.join(bytes(p[p != self.eot_id].astype(np.uint8)).decode(
        "utf-8", errors="replace") for p in parts)

  def token_bytes(self) -> np.ndarray:
    return np.append(np.ones(256, np.int32), 0)

  def to_json(self) -> dict:
    return {"kind": self.kind}


class BPETokenizer(_Tokenizer):
  """A byte-level BPE (GPT-2's kind) in Hugging Face `tokenizers`: every token
  is a run of bytes, so text round-trips and byte counts are exact."""
  kind = "bpe"
  FILE = "tokenizer.json"

  def __init__(self, tok: hf.Tokenizer):
    tok.add_special_tokens([EOT])  # keeps GPT-2's id 50256 where present
    tok.encode_special_tokens = True  # "<|endoftext|>" in text is plain text
    self._tok = tok
    self.eot_id = tok.token_to_id(EOT)
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    alphabet = set(hf.pre_tokenizers.ByteLevel.alphabet())
    special = set(tok.get_added_tokens_decoder())
    self._token_bytes = np.zeros(self.vocab_size, np.int32)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
      if i not in special:
        if not set(token) <= alphabet:
          raise ValueError(f"token {token!r} is not byte-level")
        self._token_bytes[i] = len(token)  # one alphabet character per byte
    ids = self.encode(PROBE)
    if (self.decode(ids) != PROBE or
        self._token_bytes[ids].sum() != len(PROBE.encode("utf-8"))):
      raise ValueError("it does not round-trip text exactly (a normalizer, or "
                       "a prefix space?)")

  @classmethod
  def train(cls, texts, vocab_size: int) -> "BPETokenizer":
    """Trained offline on `texts`; vocab_size counts the 256 bytes and EOT
    (it is smaller when the text has fewer merges to offer)."""
    tok = _byte_level(hf.models.BPE())
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return cls(tok)

  @classmethod
  def load(cls, path: str) -> "BPETokenizer":
    """From a tokenizer.json, or a folder holding one or GPT-2's
    vocab.json + merges.txt."""
    if os.path.isdir(path) and not os.path.exists(
        os.path.join(path, cls.FILE)):
      model = hf.models.BPE.from_file(os.path.join(path, "vocab.json"),
                                      os.path.join(path, "merges.txt"))
      return cls(_byte_level(model))
    if os.path.isdir(path):
      path = os.path.join(path, cls.FILE)
    return cls(hf.Tokenizer.from_file(path))

  def encode(self, text: str) -> np.ndarray:
    return np.array(self._tok.encode(text, add_special_tokens=False).ids,
                    np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.array(e.ids, np.int32) for e in
            self._tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    return self._token_bytes

  def to_str(self) -> str:
    return self._tok.to_str()

  def to_json(self) -> dict:
    digest = hashlib.sha256(self.to_str().encode()).hexdigest()
    return {"kind": self.kind, "file": self.FILE, "sha256": digest}

  def save(self, directory: str) -> None:
    with disk.replacing(os.path.join(directory, self.FILE)) as f:
      f.write(self.to_str())


def _byte_level(model) -> hf.Tokenizer:
  tok = hf.Tokenizer(model)
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  return tok


def fingerprint(tokenizer) -> str:
  return hashlib.sha256(
      json.dumps(tokenizer.to_json(), sort_keys=True).encode()).hexdigest()


def from_json(spec: dict, directory: str = ""):
  """The tokenizer that `to_json` described (a BPE's file is in directory)."""
  if spec["kind"] == "char":
    return CharTokenizer(spec["chars"])
  if spec["kind"] == "byte":
    return ByteTokenizer()
  if spec["kind"] == "bpe":
    tok = BPETokenizer.load(os.path.join(directory, spec["file"]))
    if tok.to_json() != spec:
      raise ValueError(f"{os.path.join(directory, spec['file'])} is not the "
                       "tokenizer this data was prepared with")
    return tok
  raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")



SPEC = "spec.json"  # to_json() of a tokenizer saved in a directory


def save_dir(tokenizer, directory: str) -> None:
  """A tokenizer in a directory of its own (a run's <workdir>/tokenizer/):
  its spec, and a BPE's tokenizer.json beside it."""
  os.makedirs(directory, exist_ok=True)
  if isinstance(tokenizer, BPETokenizer):
    tokenizer.save(directory)
  disk.write_json(os.path.join(directory, SPEC), tokenizer.to_json(),
                  indent=None, ensure_ascii=False)


def load_dir(directory: str):
  """The tokenizer that save_dir (or a Hugging Face import) wrote, or None
  where there is none."""
  path = os.path.join(directory, SPEC)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return from_json(json.load(f), directory)


def same(a, b) -> bool:
  """Whether two tokenizers give every text the same ids. BPEs compare by
  vocabulary and merges: the same GPT-2 files give the same model whether
  read from tokenizer.json or vocab.json + merges.txt."""
  if a.kind != b.kind:
    return False
  if a.kind != "bpe":
    return a.to_json() == b.to_json()
  model = lambda t: json.loads(t.to_str())["model"]
  return all(model(a)[k] == model(b)[k] for k in ("vocab", "merges"))


def describe(tokenizer) -> str:
  return f"{tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} ids"
