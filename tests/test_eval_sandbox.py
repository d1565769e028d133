"""Tests for the code-execution sandbox, including hostile programs.

Every hostile program runs under conservative limits (<= 512 MiB address space,
<= 16 processes, a few seconds), and the ones that rely on kernel-level layers
with the in-process guard switched off are skipped where those layers are not
available, so that they can never harm the machine running the tests.
"""

import concurrent.futures
import os
import socket
import textwrap
import time

import pytest

from blockdiff_jax.evaluation import sandbox

LIMITS = sandbox.SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=16)
NO_GUARD = sandbox.SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=16,
                                 guard=False)
AVAILABLE = sandbox.available_isolation()
_leftover_processes = sandbox._uid_processes  # pylint: disable=protected-access


def _needs(feature):
  return pytest.mark.skipif(feature not in AVAILABLE,
                            reason=f"kernel layer {feature!r} unavailable here")


def _run(source, limits=LIMITS):
  return sandbox.run_program(textwrap.dedent(source), limits=limits)


def _assert_sandbox_still_works():
  result = _run("print(6 * 7)")
  assert result.status == "passed", result
  assert result.stdout.strip() == "42"


def test_passing_program_captures_stdout():
  result = _run("print('hello')")
  assert result.passed and result.returncode == 0
  assert result.stdout == "hello\n"
  assert result.isolation == ("rlimits",) + tuple(
      f for f in sandbox.ISOLATION_FEATURES if f in AVAILABLE)


def test_exception_is_failed_with_detail():
  result = _run("raise ValueError('boom')")
  assert result.status == "failed" and result.returncode == 1
  assert result.detail == "ValueError: boom"
  assert "Traceback" in result.stderr


def test_future_import_and_line_numbers_unaffected_by_guard():
  result = _run("""\
      from __future__ import annotations
      def f(x: UndefinedName) -> int:
        return 1
      assert f(0) == 2
      """)
  assert result.status == "failed"
  assert 'program.py", line 4' in result.stderr


def test_temporary_directory_is_cwd_and_deleted():
  result = _run("""\
      import os
      with open('scratch.txt', 'w') as f:
        f.write('ok')
      print(os.getcwd())
      """)
  assert result.passed, result
  workdir = result.stdout.strip()
  assert os.path.basename(workdir) == "work"
  assert not os.path.exists(workdir)


def test_minimal_environment():
  result = _run("import os; print(sorted(os.environ))")
  assert result.passed
  assert "PATH" in result.stdout and "HOME" in result.stdout
  assert "PYTHONPATH" not in result.stdout and "SSH" not in result.stdout


def test_infinite_loop_times_out_within_limit():
  limits = sandbox.SandboxLimits(timeout_s=1.0, memory_mb=512)
  start = time.monotonic()
  result = sandbox.run_program("while True:\n  pass\n", limits=limits)
  assert result.status == "timeout"
  assert 1.0 <= result.wall_time_s < 2.0
  assert time.monotonic() - start < 3.0
  _assert_sandbox_still_works()


def test_huge_allocation_is_refused():
  result = _run("x = bytearray(8 << 30)\nprint(len(x))")
  assert result.status in ("failed", "killed")
  assert "MemoryError" in result.detail
  _assert_sandbox_still_works()


def test_output_is_truncated_to_tail():
  limits = sandbox.SandboxLimits(timeout_s=2.0, output_tail_chars=100)
  result = sandbox.run_program("print('x' * 100000)\nprint('END')",
                               limits=limits)
  assert result.passed
  assert len(result.stdout) == 100 and result.stdout.endswith("END\n")


def test_huge_file_write_hits_file_size_limit():
  limits = sandbox.SandboxLimits(timeout_s=2.0, max_file_mb=1, memory_mb=512)
  result = sandbox.run_program(
      "with open('big', 'wb') as f:\n  f.write(b'0' * (4 << 20))\n",
      limits=limits)
  assert result.status in ("killed", "failed")
  assert "SIGXFSZ" in result.detail or "File too large" in result.detail


@pytest.mark.parametrize("limits", [LIMITS, NO_GUARD], ids=["guard", "os"])
def test_write_outside_sandbox_leaves_no_file(tmp_path, limits):
  if not limits.guard and not {"readonly_fs", "uid"} & AVAILABLE:
    pytest.skip("no kernel-level write protection here")
  # World-writable, as /tmp is: only the guard or a read-only mount stop it.
  os.chmod(tmp_path, 0o777)
  target = tmp_path / "escaped.txt"
  result = _run(f"open({str(target)!r}, 'w').write('pwned')", limits)
  assert result.status == "failed"
  assert "PermissionError" in result.detail or "Read-only" in result.detail
  assert not target.exists()
  _assert_sandbox_still_works()


@pytest.mark.parametrize("limits", [LIMITS, NO_GUARD], ids=["guard", "os"])
def test_socket_to_localhost_fails(limits):
  if not limits.guard and "netns" not in AVAILABLE:
    pytest.skip("no network namespace here")
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    result = _run(f"""\
        import socket
        s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
        s.sendall(b'leak')
        """, limits)
    assert result.status == "failed"
    assert ("PermissionError" in result.detail or
            "unreachable" in result.detail), result.detail
    with pytest.raises(BlockingIOError):
      server.accept()


def test_fork_bomb_blocked_by_guard():
  result = _run("""\
      import os
      while True:
        os.fork()
      """)
  assert result.status == "failed"
  assert "os.fork is disabled" in result.detail


@_needs("uid")
def test_fork_bomb_contained_by_process_limit():
  # Without the guard the bomb really forks: RLIMIT_NPROC of the throw-away
  # uid caps it at 16 processes, and the timeout kills all of them.
  start = time.monotonic()
  result = _run("""\
      import os
      while True:
        try:
          os.fork()
        except OSError:
          pass
      """, NO_GUARD)
  assert result.status in ("timeout", "killed")
  assert time.monotonic() - start < NO_GUARD.timeout_s + 3.0
  assert result.uid is not None
  assert not _leftover_processes(result.uid)
  _assert_sandbox_still_works()


@_needs("uid")
def test_setsid_escapee_is_killed_after_run():
  result = _run("""\
      import os, time
      if os.fork() == 0:
        os.setsid()
        time.sleep(60)
      print('parent done')
      """, NO_GUARD)
  assert result.passed, result
  assert not _leftover_processes(result.uid)


@_needs("uid")
def test_kill_everything_only_reaches_own_processes():
  # As root this would kill the whole machine; as the sandbox uid, nothing.
  result = _run("import os\nos.kill(-1, 9)\nprint('alive')", NO_GUARD)
  assert result.status in ("passed", "killed")
  _assert_sandbox_still_works()


@_needs("uid")
def test_private_files_are_unreadable():
  if not os.path.exists("/etc/shadow"):
    pytest.skip("no /etc/shadow")
  result = _run("open('/etc/shadow').read()", NO_GUARD)
  assert result.status == "failed"
  assert "PermissionError" in result.detail


def test_hostile_programs_in_parallel_do_not_stop_the_run(tmp_path):
  target = tmp_path / "x"
  programs = [
      "print('ok')",
      "while True:\n  pass",
      "import os\nwhile True:\n  os.fork()",
      "x = bytearray(8 << 30)",
      f"open({str(target)!r}, 'w')",
      "import socket\nsocket.socket()",
      "print('ok')",
  ]
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(lambda p: sandbox.run_program(p, limits=LIMITS),
                            programs))
  statuses = [r.status for r in results]
  assert statuses == ["passed", "timeout", "failed", "failed", "failed",
                      "failed", "passed"]
  assert not target.exists()


def test_limits_validation():
  with pytest.raises(ValueError, match="timeout_s"):
    sandbox.SandboxLimits(timeout_s=0)
  with pytest.raises(ValueError, match="memory_mb"):
    sandbox.SandboxLimits(memory_mb=0)
