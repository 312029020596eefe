"""One writer per workdir: lock files that work on shared file systems.

A lock is a JSON file naming its owner (host, pids, when it started) and a
heartbeat (unix time) that the owner renews every HEARTBEAT_S. It is created
whole and only where none exists (a hard link to a file already written:
atomic on NFS too), and renewed by an atomic rename. It is stale when its
host is this one and none of its processes lives (a SIGKILL frees it at
once), or when its heartbeat is older than STALE_S (the only test for other
hosts' locks: a lost node frees it after STALE_S). flock is not used: it
does not always hold across the hosts of a shared file system.

train.py's train and cooldown modes hold `<workdir>/workdir.lock`
(WorkdirLock); launch/sweep/ holds `<workdir>/sweep.lock` while it runs a
train.py there (launch.sweep.status.Lock). This module imports no JAX.
"""

import datetime
import json
import os
import threading
import time

import layout
from data import disk
from trainer.errors import WorkdirInUse

HOST = disk.HOST
HEARTBEAT_S = 5  # how often an owner renews its lock
STALE_S = 120    # a lock not renewed for this long is stale


def read_json(path: str) -> dict | None:
  """None if the file is absent; {} if it cannot be read as JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def start_ticks(pid: int) -> int | None:
  """When process `pid` started (clock ticks since boot; Linux), which tells
  a live process from a later one that reuses its pid; None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def alive(pid: int, started: int | None = None) -> bool:
  """Whether `pid` runs on this host (and, given `started` (start_ticks),
  is still the process that started then)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    pass
  try:  # Linux: a zombie has exited (its parent has not yet reaped it)
    with open(f"/proc/{pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "Z":
        return False
  except OSError:
    return True
  return started is None or start_ticks(pid) in (started, None)


class LockFile:
  """A claim on the file `path`. Subclasses name the owner's fields: PIDS,
  its processes on its host (`<name>_start`, if present, holds a pid's
  start_ticks); IDENTITY, the fields that tell this owner from a later
  one."""

  PIDS = ("pid",)
  IDENTITY = ("host", "pid", "started")

  def __init__(self, path: str, owner: dict):
    self.path, self.owner = path, owner

  @classmethod
  def take(cls, path: str, owner: dict):
    """(lock or None, the lock found there, if any): None while a live
    owner holds it. A stale lock is first moved aside (see _move_aside)."""
    found = read_json(path)
    if found is not None and (not cls.stale(found, path) or
                              not _move_aside(path, found)):
      return None, found
    if _create(path, owner):
      return cls(path, owner), found
    return None, read_json(path)  # another taker was first

  @classmethod
  def stale(cls, found: dict, path: str) -> bool:
    try:  # an unreadable lock is as old as its file
      heartbeat = found.get("heartbeat") or os.path.getmtime(path)
    except OSError:  # released meanwhile
      return False
    if found.get("host") == HOST:  # the pids say: a suspended owner is alive
      return not any(alive(found[k], found.get(f"{k}_start"))
                     for k in cls.PIDS if found.get(k))
    return time.time() - heartbeat > STALE_S

  @classmethod
  def holder(cls, path: str) -> dict | None:
    """The owner of a live lock at `path`, else None."""
    found = read_json(path)
    return None if found is None or cls.stale(found, path) else found

  def ours(self) -> bool:
    found = read_json(self.path) or {}
    return all(found.get(k) == self.owner[k] for k in self.IDENTITY)

  def renew(self, **fields) -> bool:
    """A new heartbeat (and `fields`); False if the lock was taken over
    meanwhile (this process looked dead, e.g. stopped for over STALE_S). A
    takeover written between the check and the write is written over: the
    taker's next beat then finds the lock not its own and stops the taker,
    so one writer remains."""
    if not self.ours():
      return False
    self.owner.update(fields, heartbeat=time.time())
    disk.write_json(self.path, self.owner)
    return True

  def release(self) -> None:
    if self.ours():
      os.unlink(self.path)


def _create(path: str, owner: dict) -> bool:
  """Creates the lock whole (a hard link to a written file), or returns
  False if it exists."""
  tmp = f"{path}.{HOST}.{os.getpid()}.new"
  disk.write_json(tmp, owner)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)


def _move_aside(path: str, stale: dict) -> bool:
  """Removes a stale lock: renamed aside (of several takers, one wins the
  rename), then checked to be the lock judged stale; one renewed meanwhile
  is put back (its owner lives)."""
  aside = f"{path}.stale.{HOST}.{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:  # another taker was first
    return False
  moved = read_json(aside)
  if moved != stale:
    try:
      os.link(aside, path)
    except FileExistsError:  # its owner will find it lost, and stop
      pass
  os.unlink(aside)
  return moved == stale


class WorkdirLock(LockFile):
  """A training process's claim on its workdir, `<workdir>/workdir.lock`,
  renewed by a thread of its own until released. `lost` is set (to the
  lock found instead) if another process took it over. A workdir that
  acquire created is removed again on release if nothing was written there
  (a refused config leaves no trace)."""

  @classmethod
  def acquire(cls, workdir: str) -> "WorkdirLock":
    """The lock, or WorkdirInUse naming its live holder."""
    created = _missing(workdir)
    os.makedirs(workdir, exist_ok=True)
    now, pid = time.time(), os.getpid()
    lock, found = cls.take(os.path.join(workdir, layout.LOCK), {
        "host": HOST, "pid": pid, "pid_start": start_ticks(pid),
        "started": now, "heartbeat": now})
    if lock is None:
      _remove_empty(created)
      raise WorkdirInUse(in_use(workdir, found or {}))
    lock.created, lock.lost = created, None
    lock._done = threading.Event()
    lock._thread = threading.Thread(target=lock._beat, daemon=True,
                                    name="workdir-lock-heartbeat")
    lock._thread.start()
    return lock

  def _beat(self) -> None:
    while not self._done.wait(HEARTBEAT_S):
      try:
        if self.renew():
          continue
        found = read_json(self.path)
        if found is None and _create(self.path, self.owner):
          continue  # deleted by hand: claimed again
        self.lost = found or {}
        return
      except OSError:  # a full or unreachable disk: the next beat retries
        pass

  def taken_over(self) -> str:
    """What happened, once `lost`."""
    return (f"pid {self.lost.get('pid', '?')} on host "
            f"{self.lost.get('host', '?')} took over the lock of "
            f"{os.path.dirname(self.path)}, not renewed by this run for "
            f"{STALE_S} s")

  def release(self) -> None:
    self._done.set()
    self._thread.join()
    if self.lost is None:
      super().release()
      _remove_empty(self.created)


def _missing(directory: str) -> list[str]:
  """The directories that creating `directory` would create, deepest
  first."""
  missing, directory = [], os.path.abspath(directory)
  while not os.path.exists(directory):
    missing.append(directory)
    directory = os.path.dirname(directory)
  return missing


def _remove_empty(directories: list[str]) -> None:
  for directory in directories:
    try:
      os.rmdir(directory)
    except OSError:  # not empty
      return


def in_use(workdir: str, holder: dict) -> str:
  """The error line's text for a workdir that `holder` (a lock's JSON)
  holds."""
  since = holder.get("started")
  when = (datetime.datetime.fromtimestamp(since, datetime.timezone.utc)
          .strftime("%Y-%m-%d %H:%M:%S UTC")
          if isinstance(since, (int, float)) else "an unknown time")
  beat = holder.get("heartbeat")
  ago = (f"heartbeat {max(0, time.time() - beat):.0f} s ago"
         if isinstance(beat, (int, float)) else "no heartbeat")
  return (f"workdir {workdir} is in use by pid {holder.get('pid', '?')} on "
          f"host {holder.get('host', '?')} since {when} ({ago}); wait for it "
          "to finish or stop it")
