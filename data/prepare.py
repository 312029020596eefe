"""Corpus -> token arrays on disk, prepared once and reused.

A prepared directory holds `train.bin` and `val.bin` (flat token arrays,
uint16 or uint32) and `meta.json` (tokenizer, counts, UTF-8 bytes, source
checksum). Whole documents are held out for validation, so no work appears in
both splits. Documents are joined by a blank line.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from data import corpus, tokenizers

SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Prepared:
  path: str
  meta: dict

  @property
  def tokenizer(self):
    return tokenizers.from_json(self.meta["tokenizer"])

  def tokens(self, split: str) -> np.ndarray:
    return np.memmap(os.path.join(self.path, f"{split}.bin"),
                     dtype=self.meta["dtype"], mode="r")


def prepare(source: str, tokenizer: str, holdout: tuple[str, ...],
            cache_dir: str = "") -> Prepared:
  cache_dir = cache_dir or corpus.default_cache_dir()
  docs = corpus.load(source, cache_dir)
  names = [name for name, _ in docs]
  missing = [h for h in holdout if h not in names]
  if missing or not holdout:
    raise corpus.DataError(
        f"data.holdout={tuple(holdout)} must name documents of the corpus "
        f"(unknown: {missing}); choose from: {', '.join(names)}")
  if len(holdout) == len(docs):
    raise corpus.DataError("data.holdout holds out every document; leave some "
                           "for training")
  checksum = hashlib.sha256()
  for name, text in docs:
    checksum.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
  key = hashlib.sha256(
      f"{checksum.hexdigest()}|{tokenizer}|{sorted(holdout)}".encode()
  ).hexdigest()[:16]
  label = "shakespeare" if source == corpus.SHAKESPEARE else "dir"
  out = os.path.join(cache_dir, "prepared", f"{label}-{tokenizer}-{key}")
  if os.path.exists(os.path.join(out, "meta.json")):
    with open(os.path.join(out, "meta.json")) as f:
      return Prepared(out, json.load(f))

  splits = {
      "train": SEPARATOR.join(t for n, t in docs if n not in holdout),
      "val": SEPARATOR.join(t for n, t in docs if n in holdout),
  }
  tok = tokenizers.fit(tokenizer, splits["train"] + splits["val"])
  dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out))
  meta = {"source": source, "source_sha256": checksum.hexdigest(),
          "tokenizer": tok.to_json(), "vocab_size": tok.vocab_size,
          "dtype": dtype, "separator": SEPARATOR,
          "documents": {"train": [n for n in names if n not in holdout],
                        "val": [n for n in names if n in holdout]}}
  for split, text in splits.items():
    ids = tok.encode(text).astype(dtype)
    ids.tofile(os.path.join(tmp, f"{split}.bin"))
    meta[f"{split}_tokens"] = int(ids.size)
    meta[f"{split}_bytes"] = len(text.encode("utf-8"))
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  try:
    os.replace(tmp, out)  # atomic: a half-written directory is never trusted
  except OSError:  # another process prepared it first
    shutil.rmtree(tmp, ignore_errors=True)
  with open(os.path.join(out, "meta.json")) as f:
    return Prepared(out, json.load(f))
