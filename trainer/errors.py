"""Why a run stops early. train.py prints each message as one line, without
a traceback, and exits with the class's status (documented in
docs/running.md)."""

from errors import BadInput, Stop


class ConfigError(BadInput):
  """A bad config value or flag; the message says how to fix it."""


class WorkdirInUse(ConfigError):
  """Another live process trains in the workdir (trainer.workdir_lock):
  this one stops before writing anything there."""


class Diverged(Stop):
  """The loss or gradients became non-finite; nothing after the last good
  checkpoint was saved."""
  exit_code = 3


class Preempted(Stop):
  """SIGTERM: the run saved a checkpoint at the current step and stopped;
  the same command resumes it."""
  exit_code = 75  # EX_TEMPFAIL: try again
  prefix = "preempted"
