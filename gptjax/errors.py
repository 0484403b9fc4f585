"""The one exception type that the command line reports as a one-line error."""


class UserError(Exception):
  """Bad input from the user: printed as `gptjax: error: <message>`, exit status 2."""
