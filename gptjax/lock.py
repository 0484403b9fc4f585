"""One trainer per run directory: OUT_DIR/gptjax.lock names the host and process that write it.

A lock whose process is gone (a run killed with -9 or by a lost machine) is taken over when it
was left on this host; from another host gptjax cannot tell, and says which file to remove.
"""

import json
import os
import pathlib
import socket

from gptjax.errors import UserError


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


class RunLock:
  """`with RunLock(out_dir):` holds the lock (if `hold`: one process of a multi-host run does) and
  releases it however the block ends."""

  def __init__(self, out_dir: str, hold: bool = True):
    self.path = pathlib.Path(out_dir) / "gptjax.lock"
    self.mine = {"host": socket.gethostname(), "pid": os.getpid()}
    self.hold = hold

  def __enter__(self) -> "RunLock":
    if self.hold:
      self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    if self.hold:
      self.release()

  def acquire(self) -> None:
    """Takes the lock, or raises a UserError naming the trainer that holds it."""
    text = json.dumps(self.mine)
    try:
      with open(self.path, "x", encoding="utf-8") as f:
        f.write(text)
      return
    except FileExistsError:
      pass
    except OSError as e:
      raise UserError(f"cannot write {self.path}: {e.strerror}") from None
    try:
      holder = json.loads(self.path.read_text(encoding="utf-8"))
      host, pid = str(holder["host"]), int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
      host, pid = "", 0  # unreadable: left half-written by a killed trainer
    if {"host": host, "pid": pid} == self.mine:
      return  # this process holds it already (an earlier run in it stopped on an error)
    if host == self.mine["host"] and pid > 0 and _alive(pid):
      raise UserError(f"{self.path.parent} is being trained by another gptjax (host {host}, pid {pid}); "
                      "wait for it to finish or stop it, or choose another train.out_dir")
    if host and host != self.mine["host"]:
      raise UserError(f"{self.path.parent} is locked by a gptjax on host {host} (pid {pid}); if that trainer "
                      f"is gone, remove {self.path}")
    tmp = self.path.with_suffix(f".{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, self.path)  # a stale lock of this host: its process is gone

  def release(self) -> None:
    try:
      if json.loads(self.path.read_text(encoding="utf-8")) == self.mine:
        self.path.unlink()
    except (OSError, ValueError):
      pass
