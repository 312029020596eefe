"""train.py with checkpoints that look damaged to this process alone, as a
bad copy on one host's disk or in its cache would.

  python tests/damaged_view.py KIND STEPS -- TRAIN_PY_ARGS...

STEPS: e.g. 20 or 10,20. KIND: `digest` (the digests this process computes
of those steps' files come out wrong) or `checksums` (their
checksums.sha256 looks missing). Only committed steps are affected: a save
writes and hashes its files under Orbax's temporary name."""

import builtins
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainer import checkpoint  # noqa: E402

_KIND, _STEPS, _ARGS = sys.argv[1], sys.argv[2].split(","), sys.argv[4:]


def _damaged(path) -> bool:
  return any(f"/checkpoints/{step}/" in str(path) for step in _STEPS)


if _KIND == "digest":
  _real_sha256 = checkpoint._sha256

  def _sha256(path: str) -> str | None:
    digest = _real_sha256(path)
    return "0" * 64 if digest and _damaged(path) else digest

  checkpoint._sha256 = _sha256
else:
  _real_open = builtins.open

  def _open(path, *args, **kwargs):
    if str(path).endswith(checkpoint.CHECKSUMS) and _damaged(path):
      raise FileNotFoundError(2, "No such file or directory", path)
    return _real_open(path, *args, **kwargs)

  builtins.open = _open
sys.argv = [os.path.join(REPO, "train.py"), *_ARGS]
runpy.run_path(sys.argv[0], run_name="__main__")
