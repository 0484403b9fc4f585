"""The `gptjax` command: gptjax {prepare,train,sample,perplexity,convert,explain,attention,plot,lower,sweep,serve,eval} ...

Bad input (a `UserError`) is printed as one line, `gptjax: error: ...`, with exit status 2.
"""

import argparse
import importlib
import logging
import os
import sys
import warnings

from gptjax import compile_cache
from gptjax.errors import SaveFailed
from gptjax.errors import UserError

COMMANDS = {
    "prepare": "gptjax.prepare",
    "train": "gptjax.train",
    "sample": "gptjax.sample",
    "perplexity": "gptjax.evaluate",
    "convert": "gptjax.convert",
    "explain": "gptjax.explain",
    "attention": "gptjax.attention_maps",
    "plot": "gptjax.plots",
    "lower": "gptjax.lower",
    "sweep": "gptjax.sweep",
    "serve": "gptjax.serve",
    "eval": "gptjax.harness",
}


class _OneLineErrors(argparse.ArgumentParser):
  """argparse reports bad arguments as `usage` plus an error; keep just the error line."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message}")


def _unless_orphaned_write(report, default=sys.unraisablehook) -> None:
  """A failed save or load reaches gptjax as one exception, and is reported in one line; Orbax's
  other reads and writes of it still finish in the background, in coroutines or in TensorStore's
  threads (which find Orbax's event loop closed), each with a traceback of its own. Not those."""
  code = getattr(report.object, "cr_code", None)
  orbax_coroutine = code is not None and "/orbax/" in code.co_filename
  closed_loop = report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"
  if not (orbax_coroutine or closed_loop):
    default(report)


def run(command: str, argv: list[str]) -> None:
  """Runs one command's `main(argv)`, turning bad input into a one-line error."""
  argparse.ArgumentParser.error = _OneLineErrors.error  # every command's parser
  # Orbax's failures arrive as exceptions and are reported here in one line, not also as its logs.
  for library in ("absl", "asyncio"):
    logging.getLogger(library).setLevel(logging.CRITICAL)
  sys.unraisablehook = _unless_orphaned_write
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)  # the same, at exit
  compile_cache.set_defaults()  # before the command imports JAX
  try:
    importlib.import_module(COMMANDS[command]).main(argv)
  except UserError as e:
    print(f"gptjax: error: {e}", file=sys.stderr)
    if isinstance(e, SaveFailed):
      sys.stderr.flush()
      os._exit(2)
    sys.exit(2)
  except KeyboardInterrupt:
    print("gptjax: interrupted", file=sys.stderr)
    sys.exit(130)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in COMMANDS:
    if argv and argv[0] in ("-h", "--help"):
      print(__doc__.strip())
      return
    print(f"gptjax: error: expected a command, one of {', '.join(COMMANDS)}", file=sys.stderr)
    sys.exit(2)
  run(argv[0], argv[1:])


if __name__ == "__main__":
  main()
