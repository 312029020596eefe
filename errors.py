"""How a command stops on what it cannot go on with: one line, an exit
status, no traceback.

Stop is raised where the problem is found, with a message that says what is
wrong and what to do; `command` (around each command line's main) prints it
as `error: <message>` and returns its exit status. BadInput (status 2) is
the one error for input a command cannot use (a config, flag, data set,
checkpoint or spec); subclasses exist where a caller tells them apart
(trainer.errors.ConfigError, data.corpus.DataError). Other stops carry
their own status (data.disk.WriteFailed 74, trainer.errors.Diverged 3,
trainer.errors.Preempted 75); docs/running.md lists them.
"""

import argparse
import functools
import sys


class Stop(Exception):
  """Ends a command with one line, `<prefix>: <message>`, and `exit_code`."""
  exit_code = 1
  prefix = "error"


class BadInput(Stop):
  """Input a command cannot use; the message says how to fix it."""
  exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
  """argparse's, with a bad command line a BadInput: one line, status 2."""

  def error(self, message):
    raise BadInput(message)


def command(main, debug: bool = False):
  """Decorates main(...) -> exit status: a Stop raised in it is printed as
  one line on stderr and its exit_code returned. With `debug`, errors (not
  a preemption) propagate, traceback and all."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Stop as e:
      if debug and e.prefix == "error":
        raise
      print(f"{e.prefix}: {e}", file=sys.stderr)
      return e.exit_code
  return wrapped
