"""Post-training examples: JSONL -> token sequences with a loss mask.

Formats, one JSON object per line (other keys are ignored):

  sft  {"prompt": "...", "response": "..."}
       {"messages": [{"role": "system" | "user" | "assistant",
                      "content": "..."}, ...]}
  dpo  {"prompt": "...", "chosen": "...", "rejected": "..."}

A prompt/response pair is the prompt's text followed by the response's and
end-of-text (EOT), nothing added. Messages go through the built-in chat
template, plain text that any tokenizer (a character one too) can spell:

  System: {content}\\n      (not a target)
  User: {content}\\n        (not a target)
  Assistant: {content}EOT  ("Assistant: " is not a target; content and EOT are)

Each piece is tokenized on its own and the ids joined, so the boundary
between prompt and response is always a token boundary: a prompt that ends
in a space keeps that space as its own (prompt) token, and the response's
first token is the one a model sampling after that prompt must produce. The
targets of a sequence are its response tokens and the EOT that closes each
response; the first token of a sequence is never one (nothing predicts it).
A dpo record makes two sequences, prompt + chosen + EOT and prompt +
rejected + EOT, stored chosen first.

A prepared directory (python -m data.prepare --format sft|dpo) holds
`meta.json` (written last), `tokenizer.json` for a BPE, and per split
`<split>.npz`: `tokens` (uint16, or uint32 above 65,536 ids), `targets`
(uint8, 1 where the token is a loss target) and `starts` (int64: sequence i
is tokens[starts[i]:starts[i + 1]]). Training on raw JSONL prepares it into
<cache_dir>/examples/ with the model's tokenizer (the workdir's, or
checkpoint.init_from's), or one fitted to the examples.

Split: by file name (`holdout`, as for text: a file's lines are one
"document" name; a copy of a held-out file under another name is held out
too), else by a hash of each record (`val_fraction`): store.Splitter.
"""

import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import os
import re

import numpy as np

from data import corpus, disk, shards, store, tokenizers
from data.corpus import DataError

VERSION = 1
# Bumped when the same inputs would be prepared otherwise, so that no cache
# prepared before is taken (2: copies of held-out files are held out too).
CACHE_VERSION = 2
FORMATS = ("sft", "dpo")
ROLES = ("system", "user", "assistant")
TEMPLATE = {"system": "System: {}\n", "user": "User: {}\n"}
ASSISTANT = "Assistant: "
EOT = None  # a piece that is the end-of-text id


@dataclasses.dataclass(frozen=True)
class Sequences:
  """The token sequences of one split, flat: sequence i is
  tokens[starts[i]:starts[i + 1]] with targets[...] its loss mask."""
  tokens: np.ndarray
  targets: np.ndarray
  starts: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1

  def lengths(self) -> np.ndarray:
    return np.diff(self.starts)

  def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = int(self.starts[i]), int(self.starts[i + 1])
    return self.tokens[a:b], self.targets[a:b]

  def targets_in_first(self, kept: np.ndarray) -> np.ndarray:
    """Per sequence, its targets among its first kept[i] tokens."""
    cumulative = np.concatenate([[0], np.cumsum(self.targets, dtype=np.int64)])
    return cumulative[self.starts[:-1] + kept] - cumulative[self.starts[:-1]]


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared directory of examples (the counterpart of prepare.Prepared)."""
  path: str
  meta: dict
  tokenizer: object

  @functools.cached_property
  def _splits(self) -> dict[str, Sequences]:
    out = {}
    for split in store.SPLITS:
      with np.load(os.path.join(self.path, f"{split}.npz")) as f:
        out[split] = Sequences(f["tokens"], f["targets"].astype(bool),
                               f["starts"])
    return out

  def sequences(self, split: str) -> Sequences:
    return self._splits[split]

  @property
  def format(self) -> str:
    return self.meta["format"]


# ---------------------------------------------------------------- records

def pieces(record, fmt: str) -> list[list]:
  """A record's sequences, each a list of (text or EOT, is_target) pieces;
  raises ValueError saying what is wrong with the record."""
  if not isinstance(record, dict):
    raise ValueError("not a JSON object")
  if fmt == "dpo":
    prompt, chosen, rejected = (_string(record, k)
                                for k in ("prompt", "chosen", "rejected"))
    return [[(prompt, False), (answer, True), (EOT, True)]
            for answer in (chosen, rejected)]
  if "messages" in record:
    if "prompt" in record or "response" in record:
      raise ValueError("give either \"messages\" or \"prompt\" and "
                       "\"response\", not both")
    return [_chat(record["messages"])]
  if "prompt" not in record and "response" not in record:
    raise ValueError("no \"prompt\" and \"response\" strings, nor a "
                     "\"messages\" list")
  return [[(_string(record, "prompt"), False),
           (_string(record, "response"), True), (EOT, True)]]


def _string(record: dict, key: str) -> str:
  value = record.get(key)
  if not isinstance(value, str):
    raise ValueError(f"no string field {key!r}" if value is None else
                     f"field {key!r} is a {type(value).__name__}, not a "
                     "string")
  return value


def _chat(messages) -> list:
  if not isinstance(messages, list) or not messages:
    raise ValueError("\"messages\" must be a non-empty list of {\"role\", "
                     "\"content\"} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not (
        isinstance(m.get("content"), str)):
      raise ValueError(f"message {i} must be {{\"role\": one of "
                       f"{list(ROLES)}, \"content\": a string}}")
    if m["role"] == "assistant":
      out += [(ASSISTANT, False), (m["content"], True), (EOT, True)]
    else:
      out.append((TEMPLATE[m["role"]].format(m["content"]), False))
  if not any(target for _, target in out):
    raise ValueError("no assistant message: nothing to learn from")
  return out


def encode(seq_pieces: list, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, targets bool) of one sequence; each piece tokenized on its
  own. The first token is never a target."""
  ids, targets = [], []
  for text, target in seq_pieces:
    piece = (np.array([tokenizer.eot_id], np.int32) if text is EOT else
             np.asarray(tokenizer.encode(text), np.int32))
    ids.append(piece)
    targets.append(np.full(len(piece), target))
  ids, targets = np.concatenate(ids), np.concatenate(targets)
  if len(targets):
    targets[0] = False
  return ids, targets


def texts(seq_pieces: list) -> str:
  """A sequence's text (EOT as nothing): what a tokenizer is fitted to."""
  return "".join(text for text, _ in seq_pieces if text is not EOT)


def read(path: str, fmt: str):
  """(line number, canonical record bytes, sequences' pieces) of each
  non-empty line of a JSONL file; a bad line raises a DataError naming
  file:line."""
  if not corpus.is_jsonl(path):
    raise DataError(f"{path} is not a .jsonl file; {fmt} examples are JSON "
                    "Lines (one object per line)")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line.removeprefix(corpus.BOM).decode("utf-8")
                            if number == 1 else line.decode("utf-8"))
        seqs = pieces(record, fmt)
        for seq in seqs:
          texts(seq).encode("utf-8")  # a lone surrogate escape
      except UnicodeError:
        raise DataError(f"{path}:{number}: not valid UTF-8 text") from None
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not a JSON object ({e.msg}); each "
                        "line must be one") from None
      except ValueError as e:
        raise DataError(f"{path}:{number}: {e} (a {fmt} record is "
                        f"{_SHAPES[fmt]})") from None
      yield number, json.dumps(record, sort_keys=True).encode(), seqs


_SHAPES = {"sft": '{"prompt", "response"} or {"messages": [{"role", '
                  '"content"}, ...]}',
           "dpo": '{"prompt", "chosen", "rejected"}'}


# ---------------------------------------------------------------- building

def build(inputs, output: str, fmt: str, tokenizer, holdout=(),
          val_fraction: float = 0.01, vocab_size: int = 8192) -> Prepared:
  """Prepares the examples of `inputs` (files, directories, globs of
  .jsonl[.gz]) into `output`. `tokenizer`: a tokenizer object, or the kind
  of one to fit to the examples ("char", "byte", "bpe" of `vocab_size`
  ids). Refused with a
  DataError: a bad line (file:line), text the tokenizer cannot spell
  (file:line), an empty split."""
  if fmt not in FORMATS:
    raise DataError(f"format {fmt!r} is unknown; choose one of "
                    f"{', '.join(FORMATS)}")
  files = corpus.find_files(inputs)
  names = sorted({corpus.name(f) for f in files})
  missing = sorted(set(holdout) - set(names))
  if missing:
    raise DataError(f"holdout {tuple(holdout)} must name files of the "
                    f"examples (unknown: {missing}); choose from: "
                    f"{', '.join(names[:30])}, or hold out examples by a "
                    "hash with an empty holdout (--config.data.holdout='()')")
  if holdout and set(names) <= set(holdout):
    raise DataError("the holdout holds out every file; leave some for "
                    "training")
  splitter = store.Splitter.of_files(files, holdout, val_fraction)
  if isinstance(tokenizer, str):
    tokenizer = _fit(tokenizer, files, fmt, vocab_size, splitter)
  os.makedirs(output, exist_ok=True)
  dtype = shards.dtype_for(tokenizer.vocab_size)
  parts = {s: ([], [], [0]) for s in store.SPLITS}
  counts = {s: {"examples": 0, "sequences": 0, "tokens": 0,
                "target_tokens": 0} for s in store.SPLITS}
  for path in files:
    for number, canonical, seqs in read(path, fmt):
      split = splitter.of(path, canonical)
      tokens, targets, starts = parts[split]
      for seq in seqs:
        try:
          ids, mask = encode(seq, tokenizer)
        except ValueError as e:  # a character outside a char vocabulary
          raise DataError(
              f"{path}:{number}: {e} ({tokenizers.describe(tokenizer)}, "
              "the model's); remove or replace it") from None
        tokens.append(ids.astype(dtype))
        targets.append(mask.astype(np.uint8))
        starts.append(starts[-1] + len(ids))
        counts[split]["tokens"] += len(ids)
        counts[split]["target_tokens"] += int(mask.sum())
      counts[split]["examples"] += 1
      counts[split]["sequences"] += len(seqs)
  for split in store.SPLITS:
    if not counts[split]["examples"]:
      raise DataError(
          f"the {split} split of {', '.join(inputs)} has no examples; "
          + ("hold out a file that has some" if holdout else
             "use more examples, a larger data.val_fraction, or hold out a "
             "file of them (data.holdout)"))
  meta = {"version": VERSION, "format": fmt, "inputs": list(inputs),
          "files": len(files), "tokenizer": tokenizer.to_json(),
          "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
          "dtype": dtype,
          "split": ({"holdout": list(holdout)} if holdout else
                    {"val_fraction": val_fraction}), "splits": {}}
  if isinstance(tokenizer, tokenizers.BPETokenizer):
    tokenizer.save(output)
  for split in store.SPLITS:
    tokens, targets, starts = parts[split]
    path = os.path.join(output, f"{split}.npz")
    with disk.replacing(path, "wb") as f:
      np.savez(f, tokens=np.concatenate(tokens), targets=np.concatenate(
          targets), starts=np.array(starts, np.int64))
    with open(path, "rb") as f:
      sha = hashlib.file_digest(f, "sha256").hexdigest()
    meta["splits"][split] = {**counts[split], "file": f"{split}.npz",
                             "sha256": sha}
    for key, value in counts[split].items():
      meta[f"{split}_{key}"] = value
  disk.write_json(os.path.join(output, store.META), meta)
  return load(output)


def _fit(kind: str, files: list[str], fmt: str, vocab_size: int,
         splitter: store.Splitter):
  """A tokenizer of `kind` fitted to the examples: a character one to all
  (it must spell the held-out ones too), a BPE to the training split's
  (data/prepare.py fits a corpus's the same way)."""
  if kind == "byte":
    return tokenizers.ByteTokenizer()
  if kind not in ("char", "bpe"):
    raise DataError(f"a {kind} tokenizer cannot be fitted to the examples; "
                    "use char, byte or bpe, or start from a model "
                    "(checkpoint.init_from) or a prepared directory that has "
                    "one")
  def sample(train_only: bool):
    for f in files:
      for _, canonical, seqs in read(f, fmt):
        if not train_only or splitter.of(f, canonical) == "train":
          yield from (texts(seq) for seq in seqs)

  if kind == "char":
    return tokenizers.CharTokenizer.fit(sample(train_only=False))
  if vocab_size < 257:
    raise DataError(f"vocabulary size {vocab_size} is too small: a "
                    "byte-level BPE needs at least 257 ids (256 bytes and "
                    "end-of-text); raise --vocab-size")
  return tokenizers.BPETokenizer.train(sample(train_only=True), vocab_size)


def load(path: str) -> Prepared:
  meta = store.read_json(os.path.join(path, store.META))
  if meta is None or meta.get("version") != VERSION or "format" not in meta:
    raise DataError(f"{path} holds no finished preparation of examples; run "
                    "python -m data.prepare --format sft|dpo again")
  for split in store.SPLITS:
    file = os.path.join(path, meta["splits"][split]["file"])
    if not os.path.exists(file):
      raise DataError(f"{file} is missing; prepare {path} again")
  try:
    tokenizer = tokenizers.from_json(meta["tokenizer"], path)
  except Exception as e:  # noqa: BLE001 - a missing or foreign file
    raise DataError(f"the tokenizer of {path} does not load ({e}); prepare "
                    "it again") from None
  return Prepared(path, meta, tokenizer)


def is_prepared(path: str) -> bool:
  """Whether `path` is a directory that build wrote (meta.json with a
  format), as opposed to a prepared text corpus or raw files."""
  meta = os.path.join(path, store.META)
  if not os.path.isfile(meta):
    return False
  try:
    return "format" in (store.read_json(meta) or {})
  except ValueError:
    return False


def prepare_source(source: str, fmt: str, tokenizer, holdout=(),
                   cache_dir: str = "", val_fraction: float = 0.01,
                   bpe_vocab_size: int = 8192) -> Prepared:
  """config.data.source for train.objective=sft or dpo: a directory made by
  `python -m data.prepare --format FMT`, or raw JSONL (a file, directory or
  glob) prepared once into <cache_dir>/examples/ with `tokenizer` (an
  object, or the kind to fit: a "bpe" of bpe_vocab_size ids) and reused
  while the files stay the same."""
  if is_prepared(source):
    data = load(source)
    if data.format != fmt:
      raise DataError(f"data.source={source!r} holds {data.format} examples, "
                      f"not the {fmt} examples train.objective={fmt!r} "
                      "trains on")
    return data
  if os.path.exists(os.path.join(source, store.META)):
    raise DataError(f"data.source={source!r} is a text corpus prepared for "
                    f"next-token training; train.objective={fmt!r} reads "
                    f"JSONL {fmt} examples ({_SHAPES[fmt]}), raw or prepared "
                    f"with python -m data.prepare --format {fmt}")
  if not glob.glob(source):
    raise DataError(f"data.source={source!r} matches no files; for "
                    f"train.objective={fmt!r} point it at JSONL {fmt} "
                    f"examples or a directory prepared from them")
  files = corpus.find_files([source])
  identity = [store.file_identity(corpus.Piece(f)) for f in files]
  spec = (tokenizers.fingerprint(tokenizer) if not isinstance(tokenizer, str)
          else [tokenizer, bpe_vocab_size] if tokenizer == "bpe" else tokenizer)
  key = store.digest(VERSION, fmt, identity, spec, list(holdout),
                     val_fraction, CACHE_VERSION)[:16]
  label = re.sub(r"[^\w.-]", "_", corpus.name(source.rstrip("/")))
  cache_dir = cache_dir or corpus.default_cache_dir()
  output = os.path.join(cache_dir, "examples", f"{label}-{fmt}-{key}")
  os.makedirs(output, exist_ok=True)
  with store.locked(output):  # one process prepares, others wait
    if is_prepared(output):
      return load(output)
    return build([source], output, fmt, tokenizer, holdout, val_fraction,
                 bpe_vocab_size)
