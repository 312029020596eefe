"""The one error type for user mistakes: train.py prints its message as one
line and exits non-zero, without a traceback."""


class ConfigError(Exception):
  """A bad config value or flag; the message says how to fix it."""
