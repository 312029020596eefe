"""Writes that fail for want of space or permission, told in one line.

A full disk or quota (ENOSPC, EDQUOT), a read-only file system (EROFS) or a
file the process may not write (EACCES, EPERM) is neither a bug nor bad
input: whatever meets one (a checkpoint save, a metrics, TensorBoard or
sample write, a data preparation) stops with WriteFailed, whose line says
what was being written, where, the space it needed and the space free.
train.py and `python -m data.prepare` exit with its status, 74 (EX_IOERR).

Small files that readers must see whole (JSON records, samples, tokenizer
files) are written through `replacing`: the old file or the new one, never a
part.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading

from errors import Stop

ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteFailed(Stop):
  """A write failed for want of space or permission; what was saved before
  is unchanged, and the same command resumes once the cause is fixed."""
  exit_code = 74


HOST = socket.gethostname()


@contextlib.contextmanager
def replacing(path: str, mode: str = "w", **open_args):
  """A file to write that replaces `path` once written whole and synced: a
  reader sees the old file or the new one, never a part. Text is UTF-8.
  The temporary is this process's and thread's own, on any host sharing the
  file system, and is removed if the write fails."""
  tmp = f"{path}.{HOST}.{os.getpid()}.{threading.get_ident()}.tmp"
  if "b" not in mode:
    open_args.setdefault("encoding", "utf-8")
  try:
    with open(tmp, mode, **open_args) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, value, indent: int = 1, **dump_args) -> None:
  """`value` as JSON and a newline, written whole (replacing)."""
  with replacing(path) as f:
    json.dump(value, f, indent=indent, **dump_args)
    f.write("\n")


def write_errno(error: BaseException | None) -> int | None:
  """The errno of ERRNOS that `error` (or an error it was raised from)
  carries, else None. Orbax's writes fail with tensorstore errors that name
  the errno only in their text."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
      found = re.search(r"os_error_code='?(\d+)", str(error))
      code = int(found.group(1)) if found else None
    if code in ERRNOS:
      return code
    error = error.__cause__ or error.__context__
  return None


def free_bytes(path: str) -> int:
  """Bytes free to this user on the file system of `path` (or of its
  nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def size(num_bytes: float) -> str:
  for unit in ("bytes", "KB", "MB", "GB"):
    if num_bytes < 1000 or unit == "GB":
      return (f"{num_bytes:.0f} {unit}" if unit == "bytes" else
              f"{num_bytes:.1f} {unit}")
    num_bytes /= 1000
  return ""


def failure(what: str, path: str, code: int, needed: int | None = None
            ) -> str:
  """'<what> failed: <cause> (<path>)', with the space needed and free when
  the disk is full."""
  text = f"{what} failed: {os.strerror(code)} ({path})"
  if code in _FULL:
    need = f"about {size(needed)}" if needed else "more"
    text += f"; it needs {need}, {size(free_bytes(path))} free there"
  return text
