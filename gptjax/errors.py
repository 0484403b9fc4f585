"""The exception types that the command line reports as a one-line error."""


class UserError(Exception):
  """Bad input from the user: printed as `gptjax: error: <message>`, exit status 2."""


class SaveFailed(UserError):
  """A checkpoint could not be written (a full disk, a read-only mount). Reported the same way,
  then the process ends at once: the failed save's writer threads are left behind, not joined."""
