"""Code that runs inside the sandbox's child processes (see `sandbox`).

Kept as source strings because it runs in fresh interpreters: the launcher
with ``python -I -S -c``, the guard/runner as a file next to the program.
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
def unescape(p):
  for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"),
                     ("\\134", "\\")):
    p = p.replace(code, char)
  return p
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_OPTS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
            "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
MS_MOVE = 8192
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
work = cfg["workdir"]
expose = cfg["expose"]
flags = 0
if cfg["netns"]:
  flags |= 0x40000000  # CLONE_NEWNET
if cfg["readonly_fs"] or expose:
  flags |= 0x00020000  # CLONE_NEWNS
if flags and libc.unshare(flags) != 0:
  fail("unshare")
if flags & 0x00020000:
  # Private first, so that nothing below propagates to the host namespace.
  if mount(None, "/", MS_REC | MS_PRIVATE) != 0:
    fail("make / private")
# Directories the sandbox uid may not search (e.g. /root, mode 0700) but that
# hold the interpreter: cover them with an empty tmpfs and bind back only the
# needed entries, so the rest (home-directory secrets) stays hidden.
for i, (hidden, names) in enumerate(expose):
  staged = []
  for j, name in enumerate(names):
    stage = os.path.join(cfg["stage"], "%d_%d" % (i, j))
    os.mkdir(stage)
    if mount(os.path.join(hidden, name), stage, MS_BIND | MS_REC) != 0:
      fail("stage %s/%s" % (hidden, name))
    staged.append((name, stage))
  if mount("tmpfs", hidden, 0, "tmpfs", "mode=0755,size=64k") != 0:
    fail("tmpfs over %s" % hidden)
  for name, stage in staged:
    os.mkdir(os.path.join(hidden, name))
    if mount(stage, os.path.join(hidden, name), MS_MOVE) != 0:
      fail("expose %s/%s" % (hidden, name))
if cfg["readonly_fs"]:
  if mount(work, work, MS_BIND) != 0:
    fail("bind sandbox dir")
  with open("/proc/self/mountinfo") as f:
    entries = [line.split() for line in f]
  for e in entries:
    point = unescape(e[4])
    if point == work:
      continue
    extra = 0
    for opt in e[5].split(","):
      extra |= MNT_OPTS.get(opt, 0)
    if mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | extra) != 0:
      fail("remount %s read-only" % point)
for name, value in cfg["rlimits"].items():
  try:
    resource.setrlimit(getattr(resource, name), (value, value))
  except (OSError, ValueError) as e:
    fail("setrlimit %s=%d: %s" % (name, value, e))
os.chdir(cfg["workdir"])
uid = cfg["uid"]
if uid is not None:
  PR_SET_NO_NEW_PRIVS = 38
  try:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
  except OSError as e:
    fail("switch to uid %d: %s" % (uid, e))
  # No setuid-root binary can hand privileges back.
  if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("no_new_privs")
try:
  os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
except OSError as e:
  fail("exec %s: %s" % (cfg["argv"][0], e))
'''

# In-process guard, run before the program (see module docstring).
GUARD = r'''
import builtins, faulthandler, io, os, sys
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
_path = sys.argv[1]
with _real_open(_path, encoding="utf-8") as _f:
  _code = compile(_f.read(), _path, "exec")
sys.argv = sys.argv[1:]
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
'''

PLAIN_RUNNER = r'''
import sys
_path = sys.argv[1]
with open(_path, encoding="utf-8") as _f:
  _code = compile(_f.read(), _path, "exec")
sys.argv = sys.argv[1:]
exec(_code, {"__name__": "__main__"})
'''
