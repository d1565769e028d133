"""Code that runs inside the sandbox's child processes (see `sandbox`).

Kept as source strings because it runs in fresh interpreters: the launcher
with ``python -I -S -c``; the runner (RUNNER_HEAD, optionally GUARD, then
RUNNER_TAIL, concatenated into one file) next to the program.
"""

# Runs (as root, if we are root) between fork/exec and the program: sets up
# namespaces, rlimits and the uid, then execs the interpreter. A separate
# launcher interpreter instead of `preexec_fn` because preexec_fn is unsafe in a
# multi-threaded parent (the scorer runs many sandboxes from a thread pool).
LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def fail(what):
  sys.stderr.write("%s %s (errno %d)\n"
                   % (cfg["error_mark"], what, ctypes.get_errno()))
  sys.stderr.flush()
  os._exit(cfg["error_rc"])
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
def mount(src, dst, flags, fstype=None, data=None):
  enc = lambda x: x.encode() if x is not None else None
  return libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data))
if cfg["mode"] == "reap":
  # Kill every process of the sandbox uid: kill(-1) as that uid reaches
  # exactly the processes it may signal, i.e. its own.
  os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
  for _ in range(1000):
    try:
      os.kill(-1, 9)
    except ProcessLookupError:
      break
  os._exit(0)
uid = cfg["uid"]
owner = uid if uid is not None else os.getuid()
private = cfg["private_fs"]
flags = 0
if cfg["netns"]:
  flags |= 0x40000000  # CLONE_NEWNET: no interfaces, own abstract sockets.
if private:
  flags |= 0x00020000  # CLONE_NEWNS
if flags and libc.unshare(flags) != 0:
  fail("unshare")
if private:
  # Private first, so that nothing below propagates to the host namespace.
  if mount(None, "/", MS_REC | MS_PRIVATE) != 0:
    fail("make / private")
  new = private["root"]
  if mount("tmpfs", new, MS_NOSUID | MS_NODEV, "tmpfs",
           "mode=0755,size=%dm,nr_inodes=%d"
           % (private["scratch_mb"], private["inodes"])) != 0:
    fail("tmpfs root")
  os.umask(0o022)
  # Read-only binds of exactly what the interpreter needs, at their own paths.
  for path in private["binds"]:
    target = new + path
    is_dir = os.path.isdir(path)
    os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
    if not is_dir:
      os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    if mount(path, target, MS_BIND) != 0:
      fail("bind %s" % path)
    nodev = 0 if path.startswith("/dev/") else MS_NODEV
    if mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
             | nodev) != 0:
      fail("remount %s read-only" % path)
  # The program and runner, readable by the sandbox uid only.
  box = new + "/sandbox"
  os.mkdir(box, 0o700)
  for name, src in private["files"].items():
    with open(src, "rb") as f:
      data = f.read()
    fd = os.open(os.path.join(box, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 0o400)
    while data:
      data = data[os.write(fd, data):]
    os.fchown(fd, owner, owner)
    os.close(fd)
  os.chown(box, owner, owner)
  os.chmod(box, 0o500)
  os.mkdir(new + "/tmp", 0o700)
  os.chown(new + "/tmp", owner, owner)
  os.chroot(new)
for name, value in cfg["rlimits"].items():
  try:
    resource.setrlimit(getattr(resource, name), (value, value))
  except (OSError, ValueError) as e:
    fail("setrlimit %s=%d: %s" % (name, value, e))
os.chdir(cfg["workdir"])
if uid is not None:
  PR_SET_NO_NEW_PRIVS = 38
  try:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
  except OSError as e:
    fail("switch to uid %d: %s" % (uid, e))
  # No setuid-root binary can hand privileges back (and none is mounted).
  if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("no_new_privs")
try:
  os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
except OSError as e:
  fail("exec %s: %s" % (cfg["argv"][0], e))
'''

# In-process guard, run before the program (see module docstring).
GUARD = r'''
import faulthandler, io
faulthandler.disable()
_SANDBOX_DIR = os.path.realpath(os.getcwd())
_real_open = io.open
_real_os_open = os.open
def _blocked(name):
  def blocked(*args, **kwargs):
    raise PermissionError("sandbox: %s is disabled" % name)
  return blocked
def _check_write(path):
  if isinstance(path, int):
    return
  full = os.path.realpath(os.fsdecode(path))
  if os.path.commonpath([full, _SANDBOX_DIR]) != _SANDBOX_DIR:
    raise PermissionError("sandbox: writing outside %s is disabled: %s"
                          % (_SANDBOX_DIR, full))
def _guarded_open(file, mode="r", *args, **kwargs):
  if any(c in mode for c in "wax+"):
    _check_write(file)
  return _real_open(file, mode, *args, **kwargs)
def _guarded_os_open(path, flags, *args, **kwargs):
  if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
    _check_write(path)
  return _real_os_open(path, flags, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove",
              "removedirs", "rmdir", "unlink", "rename", "renames", "replace",
              "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
              "fchown", "lchown", "chroot", "chdir", "fchdir",
              "setuid", "setgid", "setsid", "link", "symlink", "execl",
              "execle", "execlp", "execlpe", "execv", "execve", "execvp",
              "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
              "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
  if hasattr(os, _name):
    setattr(os, _name, _blocked("os." + _name))
def _patch_shutil(m):
  for name in ("rmtree", "move", "chown"):
    setattr(m, name, _blocked("shutil." + name))
def _patch_subprocess(m):
  for name in ("Popen", "run", "call", "check_call", "check_output",
               "getoutput", "getstatusoutput"):
    setattr(m, name, _blocked("subprocess." + name))
def _patch_socket(m):
  # Patch _socket only once socket.py has subclassed the real type.
  for mod in (m, sys.modules["_socket"]):
    for name in ("socket", "socketpair", "fromfd", "create_connection",
                 "create_server", "SocketType"):
      if hasattr(mod, name):
        setattr(mod, name, _blocked("socket." + name))
def _patch_raw_socket(m):
  import socket
_PATCHES = {"shutil": _patch_shutil, "subprocess": _patch_subprocess,
            "socket": _patch_socket, "_socket": _patch_raw_socket}
class _PatchingLoader:
  def __init__(self, loader, patch):
    self.loader, self.patch = loader, patch
  def create_module(self, spec):
    return self.loader.create_module(spec)
  def exec_module(self, module):
    self.loader.exec_module(module)
    self.patch(module)
class _PatchingFinder:
  """Patches dangerous modules when first imported; importing them eagerly
  would cost more than the typical test program."""
  def find_spec(self, name, path=None, target=None):
    if name not in _PATCHES:
      return None
    for finder in sys.meta_path:
      if finder is not self and hasattr(finder, "find_spec"):
        spec = finder.find_spec(name, path, target)
        if spec is not None:
          spec.loader = _PatchingLoader(spec.loader, _PATCHES[name])
          return spec
    return None
sys.meta_path.insert(0, _PatchingFinder())
for _name, _patch in list(_PATCHES.items()):
  if _name in sys.modules and not (_name == "_socket" and
                                   "socket" in sys.modules):
    _patch(sys.modules[_name])
for _name in ("multiprocessing", "resource", "psutil", "tkinter", "ipdb",
              "joblib", "ctypes", "_ctypes"):
  sys.modules[_name] = None
builtins.help = None
del _name, _patch
'''

# Runs first, before any untrusted code: takes the nonce from its pipe (and
# closes it) and keeps the primitives needed to call the check and to report
# success, so that a program that rebinds os.write / os._exit / eval /
# sys.stderr cannot redirect them.
# argv: runner.py NONCE_FD PROOF_FD PROGRAM SPLITS [CALL]; NONCE_FD -1: no call; SPLITS:
# comma-separated character offsets where the program's separately compiled parts begin.
RUNNER_HEAD = r'''
import builtins, os, sys, traceback
def _make_prover():
  nonce_fd, proof_fd = int(sys.argv[1]), int(sys.argv[2])
  read, write, exit_ = os.read, os.write, os._exit
  nonce = b""
  if nonce_fd >= 0:
    while True:
      chunk = read(nonce_fd, 64)
      if not chunk:
        break
      nonce += chunk
    os.close(nonce_fd)
  def prove():
    data = nonce
    while data:
      data = data[write(proof_fd, data):]
    exit_(0)
  return prove
_prove = _make_prover()
_exit = os._exit
_eval = builtins.eval
_print_exception = traceback.print_exception
_stdout, _stderr = sys.stdout, sys.stderr
_path = sys.argv[3]
_splits = [int(x) for x in sys.argv[4].split(",") if x]
_call = sys.argv[5] if len(sys.argv) > 5 else None
'''

# Runs the program; with a CALL, reports success only if CALL returned, and
# turns every other ending (exception, SystemExit, os._exit from anywhere) into
# an exit without the proof, which the parent scores as failed. Everything it
# uses after the program starts is a local of `_run_main`, handed over (and
# removed from the module's globals) before the program runs, so rebinding a
# global of this module (``import __main__``) changes nothing.
RUNNER_TAIL = r'''
def _run_main(path, splits, call, prove, exit_, eval_, print_exception, stdout,
              stderr):
  # newline="": the split offsets count the program's own characters ("\r\n" is two).
  with open(path, encoding="utf-8", newline="") as f:
    text = f.read()
  # Each part compiles as a whole module of its own, so that one cannot change how the
  # next parses (a completion's dangling "@decorator" would otherwise wrap the test's
  # check); the padding keeps the program's line numbers in tracebacks.
  codes, start = [], 0
  for end in splits + [len(text)]:
    head = text[:start]
    lines = head.count("\n") + head.count("\r") - head.count("\r\n")
    lines -= head.endswith("\r") and text.startswith("\n", start)  # One "\r\n" across.
    codes.append(compile("\n" * lines + text[start:end], path, "exec"))
    start = end
  call_code = compile(call, "<check>", "eval") if call is not None else None

  def shorten(error, keep=100):
    # traceback.print_exception formats every frame: for a runaway recursion under a
    # raised recursion limit (10**6) that took minutes, and the run read as a timeout.
    seen = set()
    while error is not None and id(error) not in seen:
      seen.add(id(error))
      depth, tb = 0, error.__traceback__
      while tb is not None:
        depth, tb = depth + 1, tb.tb_next
      if depth > keep:
        tb = error.__traceback__
        for _ in range(depth - keep):
          tb = tb.tb_next
        error.__traceback__ = tb
        stderr.write("sandbox: %d outer frames of the %s traceback omitted\n"
                     % (depth - keep, type(error).__name__))
      error = error.__cause__ or error.__context__
  sys.argv = [path]
  program_globals = {"__name__": "__main__", "__builtins__": builtins}
  if call_code is None:
    for code in codes:
      exec(code, program_globals)
    return
  returned = False
  try:
    for code in codes:
      exec(code, program_globals)
    eval_(call_code, program_globals)
    returned = True
  except SystemExit as e:
    try:
      stderr.write("sandbox: the program raised SystemExit(%r) before %s "
                   "returned\n" % (e.code, call))
    except BaseException:
      pass
  except BaseException as e:
    try:
      shorten(e)
      print_exception(e, file=stderr)
    except BaseException:
      pass
  for stream in (stdout, stderr):
    try:
      stream.flush()
    except BaseException:
      pass
  if returned:
    prove()
  exit_(1)
_run_main(*[globals().pop(name) for name in (
    "_path", "_splits", "_call", "_prove", "_exit", "_eval", "_print_exception",
    "_stdout", "_stderr")])
'''
