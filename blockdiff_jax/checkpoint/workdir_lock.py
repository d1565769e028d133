"""One training run per workdir: an exclusive ``flock`` on ``workdir/.lock``.

The kernel drops a ``flock`` when its holder exits (also on ``kill -9``), so a lock file
left behind by a dead run never blocks the next one. The file records the holder's
PID and host, which the error for a second run names. ``flock`` is advisory and, on some
network filesystems, local to one host.
"""

import datetime
import fcntl
import os
import socket

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds the workdir for this process, or raises."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
      os.close(fd)
      raise WorkdirLockedError(
          f"workdir {os.path.dirname(self.path)} is in use by {holder}; wait for that run "
          f"to finish or stop it (a training run stopped by SIGTERM or Ctrl-C saves a "
          f"checkpoint first; lock file {self.path})") from None
    except OSError:  # No locks on this filesystem (ENOLCK): the descriptor is still ours.
      os.close(fd)
      raise
    try:
      os.ftruncate(fd, 0)
      now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
      os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {now}\n".encode(),
                0)
    except BaseException:
      # A failed write (full disk, quota) left the lock held by a descriptor nothing
      # could release: every later run in this process was refused as "in use" by itself.
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
