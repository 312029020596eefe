"""The one error of a sweep's input."""


class SpecError(Exception):
  """A bad spec or command line: reported as one line, exit status 2."""
