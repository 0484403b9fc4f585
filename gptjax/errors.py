"""How the command line reports what went wrong: exceptions printed as a one-line error, and warnings."""

import sys


class UserError(Exception):
  """Bad input from the user: printed as `gptjax: error: <message>`, exit status 2."""


class SaveFailed(UserError):
  """A checkpoint could not be written (a full disk, a read-only mount). Reported the same way,
  then the process ends at once: the failed save's writer threads are left behind, not joined."""


def warn(message: str) -> None:
  """A line on stderr, `gptjax: warning: <message>`: something went wrong that gptjax worked around."""
  print(f"gptjax: warning: {message}", file=sys.stderr, flush=True)
