"""Corpus -> token shards on disk, prepared once and reused.

  python -m data.prepare --input 'corpus/**/*.txt' --output data/mine \\
      --tokenizer bpe --vocab-size 8192

A prepared directory holds `meta.json`, written last and atomically (training
accepts a directory only once it exists): the tokenizer, per split the counts
of documents, tokens and UTF-8 bytes and the shards (file, tokens, sha256);
`tokenizer.json` for a BPE; and `shards/`: flat token arrays, uint16 when the
vocabulary fits, else uint32.

Packing: every document is followed by the end-of-text token (EOT, 0 bytes);
a split is its shards concatenated in meta order, which the loader cuts into
full windows: nothing is padded. Empty documents are skipped.

Split (store.Splitter): a document is held out for validation if its name
(its file's without extensions, in any folder: corpus.py) is in `holdout`,
or if its file has the bytes of such a file (a copy under another name);
without a holdout, if a hash of its UTF-8 bytes falls below `val_fraction`.
Either way the split depends on neither file order nor worker count.

Work (data/work.py): the input files are cut into tasks (consecutive files
of about `task_bytes`, or ranges of a larger uncompressed .jsonl) that
worker processes stream through. A task's shards, then the record naming them, are written
under temporary names and renamed, keyed by the task's files (path, size,
modification time) and the settings: a re-run processes only new or changed
inputs and never trusts a half-written shard; shards of inputs that changed
or went are deleted (do not re-prepare a directory a run is reading). One
preparation of a directory runs at a time; others wait. A tokenizer fitted to
the corpus (char; bpe, on about `bpe_sample_bytes` of documents from tasks
spread over it) is fitted on the first run and kept by later ones.
"""

import argparse
import dataclasses
import functools
import glob
import os
import re
import shutil
import sys
from typing import Iterator, Sequence

import numpy as np
import tqdm

import errors
import layout
from data import corpus, disk, examples, shards, store, tokenizers, work
from data.corpus import DataError

VERSION = 1
# Of the data cache's keys for raw sources: 2 since a BPE is fitted to the
# training split alone (a cached corpus of before would keep its tokenizer).
CACHE_VERSION = 2
KINDS = ("char", "byte", "bpe", "gpt2")


@dataclasses.dataclass(frozen=True)
class Options:
  tokenizer: str             # one of KINDS
  vocab_size: int = 8192     # bpe: ids in all, the 256 bytes and EOT included
  tokenizer_files: str = ""  # gpt2: tokenizer.json, or vocab.json + merges.txt
  text_field: str = "text"   # of a .jsonl record
  utf8: str = "strict"       # or "replace": invalid UTF-8 becomes U+FFFD
  val_fraction: float = 0.01
  holdout: tuple[str, ...] = ()  # document names; overrides val_fraction
  seq_len: int = 0           # each split must hold seq_len + 1 tokens
  workers: int = 0           # processes; 0: all in this one
  progress: bool = False     # a progress bar on stderr
  bpe_sample_bytes: int = 1 << 30  # of documents to train a BPE on
  task_bytes: int = 32 << 20
  shard_tokens: int = 1 << 27


@dataclasses.dataclass(frozen=True)
class Prepared:
  path: str
  meta: dict
  tokenizer: object

  @functools.cached_property
  def _splits(self) -> dict[str, shards.Tokens]:
    return {split: shards.Tokens([os.path.join(self.path, s["file"])
                           for s in self.meta["splits"][split]["shards"]],
                          self.meta["dtype"]) for split in store.SPLITS}

  def tokens(self, split: str) -> shards.Tokens:
    return self._splits[split]


# What readers of a prepared directory take from its meta.json.
_META_KEYS = ("tokenizer", "vocab_size", "dtype", "splits", "train_tokens",
              "val_tokens")


def load(path: str) -> Prepared:
  """A directory that `build` finished."""
  meta = _read_meta(path)
  if meta is None:
    raise DataError(f"{path} holds no finished preparation (no "
                    f"{store.META}); run python -m data.prepare again to "
                    "finish it")
  for name, expected in _shard_bytes(meta).items():
    file = os.path.join(path, name)
    if not os.path.exists(file) or os.path.getsize(file) != expected:
      raise DataError(f"{file} is missing or not the {expected} bytes that "
                      f"{store.META} records; prepare {path} again")
  return Prepared(path, meta, _load_tokenizer(meta, path))


def _read_meta(path: str) -> dict | None:
  """The meta.json of `path`, None if there is none; one that is damaged
  (not JSON, cut short, keys missing) or another version's is refused with
  a line saying to prepare the directory again, which rewrites it."""
  file = os.path.join(path, store.META)
  try:
    meta = store.read_json(file)
    if meta is None:
      return None
    if meta.get("version") != VERSION:
      raise DataError(f"{path} was prepared by another version of this "
                      "code; prepare it again")
    problem = next((f"no {key!r}" for key in _META_KEYS if key not in meta),
                   "")
    _shard_bytes(meta)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    problem = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
  if problem:
    raise DataError(f"{file} is damaged ({problem.splitlines()[0]}); "
                    f"prepare {path} again (python -m data.prepare, the same "
                    "command)")
  return meta


def _shard_bytes(meta: dict) -> dict[str, int]:
  """The size of each shard file, by its name in the directory."""
  itemsize = np.dtype(meta["dtype"]).itemsize
  return {shard["file"]: int(shard["tokens"]) * itemsize
          for split in store.SPLITS
          for shard in meta["splits"][split]["shards"]}


def prepare(source: str, tokenizer: str, holdout: tuple[str, ...],
            cache_dir: str = "", val_fraction: float = 0.01,
            bpe_vocab_size: int = Options.vocab_size) -> Prepared:
  """The data of config.data: a directory made by `python -m data.prepare`
  (its own tokenizer and split apply), or raw text ('shakespeare', or a
  directory, file or glob of .txt / .jsonl files) prepared once into
  <cache_dir>/prepared/ and reused while the files stay the same."""
  if (os.path.exists(os.path.join(source, store.META)) or
      os.path.exists(os.path.join(source, store.LOCK))):
    return load(source)
  cache_dir = cache_dir or corpus.default_cache_dir()
  if source == corpus.SHAKESPEARE:
    inputs = [corpus.shakespeare_dir(cache_dir)]
  elif glob.glob(source):
    inputs = [source]
  else:
    raise DataError(
        f"data.source={source!r} is neither 'shakespeare' nor a directory, "
        "file or glob of .txt / .jsonl text, nor a directory made by "
        "python -m data.prepare; point it at one")
  files = corpus.find_files(inputs)
  options = Options(tokenizer=tokenizer, holdout=tuple(holdout),
                    val_fraction=val_fraction, vocab_size=(
                        bpe_vocab_size if tokenizer == "bpe"
                        else Options.vocab_size))
  key = store.digest([store.file_identity(corpus.Piece(f)) for f in files],
                      dataclasses.asdict(options), CACHE_VERSION)[:16]
  label = re.sub(r"[^\w.-]", "_", corpus.name(source.rstrip("/")))
  return build(inputs, os.path.join(cache_dir, "prepared",
                                    f"{label}-{tokenizer}-{key}"), options)


def of_config(config, tokenizer=None):
  """The data of a run's config: its text for train.objective='next-token'
  (prepare()), else its sft or dpo examples (examples.prepare_source),
  tokenized with `tokenizer` if given, else with one of data.tokenizer's
  kind fitted to them."""
  d = config.data
  if config.train.objective == "next-token":
    return prepare(d.source, d.tokenizer, tuple(d.holdout), d.cache_dir,
                   d.val_fraction, d.bpe_vocab_size)
  return examples.prepare_source(d.source, config.train.objective,
                                 tokenizer or d.tokenizer, tuple(d.holdout),
                                 d.cache_dir, d.val_fraction,
                                 d.bpe_vocab_size)


def build(inputs: Sequence[str], output: str, options: Options) -> Prepared:
  """Prepares the documents of `inputs` (files, directories, globs) into
  `output`, reusing what an earlier run there did."""
  files = corpus.find_files(inputs)
  _check(options, files)
  created = not os.path.exists(output)
  try:
    os.makedirs(os.path.join(output, work.SHARDS), exist_ok=True)
    with store.locked(output):
      return _build(inputs, files, output, options)
  except BaseException as e:
    kept = _keep_or_remove(output, created)
    code = disk.write_errno(e)
    if code is None:
      raise
    raise disk.WriteFailed(disk.failure(
        f"preparing {output}", getattr(e, "filename", None) or output, code,
        _shards_bound(files, options)) + "; " + kept) from None


def _shards_bound(files: list[str], options: Options) -> int:
  """Bytes that the shards of `files` take at most: a token per input byte
  (uncompressed), 2 or 4 bytes each."""
  large = options.tokenizer == "bpe" and options.vocab_size > 2**16
  return (4 if large else 2) * sum(map(os.path.getsize, files))


def _keep_or_remove(output: str, created: bool) -> str:
  """After a failed build: removes an output it created that holds no
  finished task; says what became of the output."""
  shards_dir = os.path.join(output, work.SHARDS)
  if created and not (os.path.isdir(shards_dir) and any(
      f.endswith(".json") for f in os.listdir(shards_dir))):
    shutil.rmtree(output, ignore_errors=True)  # nothing worth keeping
    return "nothing was kept; run the same command once there is room"
  return (f"the finished part is kept (without {store.META}, so nothing "
          "takes it for complete) and the same command continues it once "
          "there is room")


def _build(inputs, files, output, options) -> Prepared:
  request = _request(options)
  try:
    old = _read_meta(output)
  except DataError:  # damaged: written afresh from the tasks' records
    old = None
  if old is not None and old.get("tokenizer_request") != request:
    raise DataError(f"{output} holds data prepared with the tokenizer "
                    f"{old.get('tokenizer_request')}, not {request}; prepare "
                    "into a new --output (or delete this one)")
  tasks = work.plan(files, options.task_bytes)
  splitter = store.Splitter.of_files(files, options.holdout,
                                     options.val_fraction)
  if old is not None:
    tok = _load_tokenizer(old, output)
  else:
    tok = _new_tokenizer(options, tasks, splitter)
    if isinstance(tok, tokenizers.BPETokenizer):
      tok.save(output)
  settings = [VERSION, tokenizers.fingerprint(tok), options.text_field,
              options.utf8, splitter.settings(), options.shard_tokens]
  tasks = [dataclasses.replace(t, key=store.digest(settings, [
      store.file_identity(p) for p in t.pieces])[:24]) for t in tasks]
  records = {t.key: r for t in tasks
             if (r := work.finished_record(output, t.key))}
  pending = [t for t in tasks if t.key not in records]
  bar = tqdm.tqdm(total=sum(t.bytes for t in pending), unit="B",
                  unit_scale=True, desc="preparing", dynamic_ncols=True,
                  disable=not options.progress)
  documents = 0
  with bar, work.runner(output, tok, options, splitter) as run:
    for record in run(pending):
      records[record["key"]] = record
      documents += sum(s["documents"] for s in record["splits"].values())
      bar.set_postfix(documents=f"{documents:,}", refresh=False)
      bar.update(record["input_bytes"])
  meta = _meta(inputs, files, tok, request, options,
               [records[t.key] for t in tasks])
  need = max(options.seq_len, 1) + 1
  for split in store.SPLITS:
    if meta[f"{split}_tokens"] < need:
      raise DataError(
          f"the {split} split has {meta[f'{split}_tokens']} tokens, fewer than "
          f"one sequence of {need} (seq_len + 1); use more text, a larger "
          "validation fraction or holdout, or a smaller --seq-len")
  if meta != old:
    disk.write_json(os.path.join(output, store.META), meta)
  work.collect_garbage(output, {t.key for t in tasks})
  return load(output)


def _check(options: Options, files: list[str]) -> None:
  """Bad options fail here, before anything is written."""
  if options.tokenizer not in KINDS:
    raise DataError(f"tokenizer {options.tokenizer!r} is unknown; choose one "
                    f"of {', '.join(KINDS)}")
  if options.tokenizer == "bpe" and options.vocab_size < 257:
    raise DataError(f"vocabulary size {options.vocab_size} is too small: a "
                    "byte-level BPE needs at least 257 ids (256 bytes and "
                    "end-of-text); raise --vocab-size")
  if options.tokenizer == "gpt2":
    _gpt2(options.tokenizer_files)
  if options.utf8 not in corpus.UTF8_POLICIES:
    raise DataError(f"utf8 policy {options.utf8!r} is unknown; choose "
                    f"{' or '.join(corpus.UTF8_POLICIES)}")
  names = sorted({corpus.name(f) for f in files})
  missing = sorted(set(options.holdout) - set(names))
  if missing:
    shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
    raise DataError(f"holdout {tuple(options.holdout)} must name documents "
                    f"of the corpus (unknown: {missing}); choose from: {shown}")
  if options.holdout and set(names) <= set(options.holdout):
    raise DataError("the holdout holds out every document; leave some for "
                    "training")
  if not options.holdout and not 0 < options.val_fraction < 1:
    raise DataError(f"validation fraction {options.val_fraction} must be "
                    "between 0 and 1 (exclusive)")


def _request(options: Options) -> dict:
  """What the tokenizer is asked to be: a re-run must ask the same."""
  request = {"kind": options.tokenizer}
  if options.tokenizer == "bpe":
    request["vocab_size"] = options.vocab_size
  if options.tokenizer == "gpt2":
    request["sha256"] = tokenizers.fingerprint(_gpt2(options.tokenizer_files))
  return request


@functools.cache
def _gpt2(path: str) -> tokenizers.BPETokenizer:
  if not path:
    raise DataError("the gpt2 tokenizer is read from local files: give "
                    "--tokenizer-files (a tokenizer.json, or a folder with "
                    "vocab.json and merges.txt)")
  try:
    return tokenizers.BPETokenizer.load(path)
  except Exception as e:  # whatever the files are, say which and why
    raise DataError(f"tokenizer files {path!r} do not load as a byte-level "
                    f"BPE ({str(e).splitlines()[0]}); give a tokenizer.json, "
                    "or a folder with vocab.json and merges.txt") from None


def _load_tokenizer(meta: dict, path: str):
  try:
    return tokenizers.from_json(meta["tokenizer"], path)
  except Exception as e:  # a missing or foreign tokenizer file
    raise DataError(f"the tokenizer of {path} does not load ({e}); prepare "
                    "it again") from None


def _new_tokenizer(options: Options, tasks: list[work.Task],
                   splitter: store.Splitter):
  if options.tokenizer == "byte":
    return tokenizers.ByteTokenizer()
  if options.tokenizer == "gpt2":
    return _gpt2(options.tokenizer_files)
  if options.tokenizer == "char":
    return tokenizers.CharTokenizer.fit(_sample(tasks, options, 0))
  return tokenizers.BPETokenizer.train(
      _sample(tasks, options, options.bpe_sample_bytes, splitter),
      options.vocab_size)


def _sample(tasks: list[work.Task], options: Options, limit: int,
            splitter: store.Splitter | None = None) -> Iterator[str]:
  """Documents to fit a tokenizer to: all (a character tokenizer must spell
  the validation text too) or, given a splitter, the training split's (a BPE
  spells any text, and its merges then learn nothing of the held-out
  text); about `limit` bytes of them from tasks spread over the corpus."""
  step = max(1, sum(t.bytes for t in tasks) // limit) if limit else 1
  seen = 0
  for task in tasks[::step]:
    for piece in task.pieces:
      for text in corpus.documents(piece, options.text_field, options.utf8):
        if splitter is not None and splitter.of(
            piece.path, text.encode("utf-8")) == "val":
          continue
        yield text
        seen += len(text)
        if limit and seen >= limit:
          return


def _meta(inputs, files, tok, request, options, records) -> dict:
  meta = {"version": VERSION, "inputs": list(inputs), "files": len(files),
          "input_bytes": sum(r["input_bytes"] for r in records),
          "tokenizer": tok.to_json(), "tokenizer_request": request,
          "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
          "dtype": shards.dtype_for(tok.vocab_size),
          "text_field": options.text_field, "utf8": options.utf8,
          "split": ({"holdout": list(options.holdout)} if options.holdout
                    else {"val_fraction": options.val_fraction}),
          "empty_documents": sum(r["empty_documents"] for r in records),
          "splits": {}}
  for split in store.SPLITS:
    parts = [r["splits"][split] for r in records]
    for count in ("documents", "tokens", "bytes"):
      meta[f"{split}_{count}"] = sum(p[count] for p in parts)
    meta["splits"][split] = {"shards": [s for p in parts for s in p["shards"]]}
  if options.holdout:  # the names of whole works, as few as the files
    meta["documents"] = {
        split: list(dict.fromkeys(n for r in records
                                  for n in r["splits"][split]["names"]))
        for split in store.SPLITS}
  return meta


# ---------------------------------------------------------------- command

@errors.command
def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m data.prepare",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description="Tokenize a corpus into a directory that training reads "
      "(config.data.source=DIR).")
  p.add_argument("--input", action="extend", nargs="+", required=True,
                 help="files, directories or quoted globs of .txt (one "
                 "document per file) and .jsonl (one per line) files, "
                 "optionally .gz")
  p.add_argument("--output", required=True, help="the prepared directory")
  p.add_argument("--tokenizer", choices=KINDS, default="bpe",
                 help="gpt2: GPT-2's byte-level BPE from --tokenizer-files")
  p.add_argument("--vocab-size", type=int, default=Options.vocab_size,
                 help="bpe: ids in all (bytes and end-of-text included)")
  p.add_argument("--tokenizer-files", default="",
                 help="gpt2: a tokenizer.json, or a folder with vocab.json "
                 "and merges.txt")
  p.add_argument("--text-field", default="text", help="of .jsonl records")
  p.add_argument("--utf8", choices=corpus.UTF8_POLICIES, default="strict",
                 help="invalid UTF-8: fail, or replace by U+FFFD")
  p.add_argument("--val-fraction", type=float, default=Options.val_fraction,
                 help="of documents, chosen by a hash of their text")
  p.add_argument("--holdout", nargs="+", default=(),
                 help="hold out these documents (file names without "
                 "extensions) instead")
  p.add_argument("--seq-len", type=int, default=1024,
                 help="each split must hold one sequence of this many tokens "
                 "+ 1")
  p.add_argument("--workers", type=int, default=os.cpu_count(),
                 help="processes (0: this one)")
  p.add_argument("--bpe-sample-mb", type=float, default=1024,
                 help="bpe: train on about this much text")
  p.add_argument("--format", choices=("text", *examples.FORMATS),
                 default="text",
                 help="text: documents for next-token training; sft, dpo: "
                 "JSONL examples for train.objective=sft or dpo (data/"
                 "examples.py: the record formats and chat template)")
  p.add_argument("--tokenizer-from", default="",
                 help="sft, dpo: use the tokenizer of this run's workdir (or "
                 "prepared directory) instead of fitting --tokenizer")
  args = p.parse_args(argv)
  try:
    summary = (_prepare_text(args) if args.format == "text" else
               _prepare_examples(args))
  except OSError as e:  # sft / dpo examples: a write that failed
    code = disk.write_errno(e)
    if code is None:
      raise
    raise disk.WriteFailed(disk.failure(f"preparing {args.output}",
                                        e.filename or args.output,
                                        code)) from e
  print(summary)
  return 0


def _prepare_text(args) -> str:
  """--format text: documents into token shards; returns a summary line."""
  options = Options(
      tokenizer=args.tokenizer, vocab_size=args.vocab_size,
      tokenizer_files=args.tokenizer_files, text_field=args.text_field,
      utf8=args.utf8, val_fraction=args.val_fraction,
      holdout=tuple(args.holdout), seq_len=args.seq_len,
      workers=args.workers, progress=sys.stderr.isatty(),
      bpe_sample_bytes=int(args.bpe_sample_mb * 2**20))
  prepared = build(args.input, args.output, options)
  m = prepared.meta
  return (f"{prepared.path}: {m['files']:,} files, "
          f"{m['train_documents']:,} + {m['val_documents']:,} documents, "
          f"{m['train_tokens']:,} train + {m['val_tokens']:,} val tokens "
          f"({m['train_bytes']:,} + {m['val_bytes']:,} bytes), "
          f"{m['tokenizer']['kind']} vocabulary {m['vocab_size']:,}")


def _prepare_examples(args) -> str:
  """--format sft|dpo: JSONL examples into token arrays with a loss mask;
  returns a summary line."""
  tokenizer = args.tokenizer
  if args.tokenizer_from:
    tokenizer = (tokenizers.load_dir(os.path.join(args.tokenizer_from,
                                                  layout.TOKENIZER)) or
                 load(args.tokenizer_from).tokenizer)
  elif args.tokenizer == "gpt2":
    tokenizer = _gpt2(args.tokenizer_files)
  prepared = examples.build(args.input, args.output, args.format, tokenizer,
                            tuple(args.holdout), args.val_fraction,
                            args.vocab_size)
  m = prepared.meta
  return (f"{prepared.path}: {m['files']:,} files, {m['train_examples']:,} "
          f"+ {m['val_examples']:,} examples, {m['train_tokens']:,} train + "
          f"{m['val_tokens']:,} val tokens ({m['train_target_tokens']:,} + "
          f"{m['val_target_tokens']:,} targets), {m['tokenizer']['kind']} "
          f"vocabulary {m['vocab_size']:,}")


if __name__ == "__main__":
  sys.exit(main())
