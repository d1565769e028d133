"""Hardening of the small train/eval helpers: distributed settings, the workdir lock,
pass@k arguments and the GPU peak under explicit dot algorithms."""

import errno
import fractions
import math
import os
import types

import jax
import pytest

from blockdiff_jax.checkpoint import workdir_lock
from blockdiff_jax.evaluation import pass_at_k as pak
from blockdiff_jax.train import distributed
from blockdiff_jax.train import hardware

ENV = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)


@pytest.fixture
def clean_env(monkeypatch):
  for k in ENV:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, "_initialized", False)
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
  return monkeypatch, calls


# ------------------------------------------------------------------ distributed


@pytest.mark.parametrize("raw", [" node-0:1234", "node-0:1234\n", "\tnode-0:1234 "])
def test_coordinator_address_is_stripped_before_jax_sees_it(clean_env, raw):
  """" node-0:1234" passed the check and reached gRPC, which could not resolve " node-0":
  both processes of a 2-process job waited out the timeout and aborted (checked by hand
  with " localhost:port")."""
  monkeypatch, calls = clean_env
  monkeypatch.setenv(distributed.ENV_COORDINATOR, raw)
  assert distributed.settings(None, 2, 1) == ("node-0:1234", 2, 1)
  assert distributed.initialize(None, 2, 1, timeout_s=5)
  assert calls[0]["coordinator_address"] == "node-0:1234"


def test_a_host_with_whitespace_inside_is_refused(clean_env):
  with pytest.raises(ValueError, match=r"'node 0:1234' must be host:port"):
    distributed.settings("node 0:1234", 2, 1)


def test_auto_leaves_the_process_count_to_jax_when_only_the_id_is_given(clean_env):
  """Under auto the id was checked against a count of 1 that nobody gave: every process
  but the first was refused before JAX could detect the count (SLURM_NTASKS)."""
  monkeypatch, calls = clean_env
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
  assert distributed.initialize(auto=True, timeout_s=7)
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": 3,
                    "initialization_timeout": 7}]
  # A count that is given still bounds the id, auto or not.
  monkeypatch.setattr(distributed, "_initialized", False)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
  with pytest.raises(ValueError, match=r"process_id=3 must be in \[0, num_processes=2\)"):
    distributed.initialize(coordinator_address="node-0:1234", auto=True)
  # Without auto an id with no count is still refused (one process has only id 0).
  monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
  with pytest.raises(ValueError, match=r"process_id=3 must be in \[0, num_processes=1\)"):
    distributed.settings()


@pytest.mark.parametrize("env, match", [
    ({distributed.ENV_NUM_PROCESSES: "0"}, r"got 0 \(from num_processes or \$JAX_NUM_PROC"),
    ({distributed.ENV_PROCESS_ID: "-1"}, r"got -1 \(from process_id or \$JAX_PROCESS_ID"),
])
def test_bad_environment_values_name_their_variable(clean_env, env, match):
  monkeypatch, _ = clean_env
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    distributed.initialize(auto=True)


# ------------------------------------------------------------------ workdir lock


def _open_fds():
  return len(os.listdir("/proc/self/fd"))


def test_a_failed_holder_write_releases_the_lock(tmp_path, monkeypatch):
  """With a full disk the holder line failed to write after the flock was taken: the
  descriptor leaked with the lock, and every later run in the process was refused as
  'in use by' itself."""
  real = os.pwrite

  def full(fd, data, offset):
    raise OSError(errno.ENOSPC, "No space left on device")

  before = _open_fds()
  monkeypatch.setattr(workdir_lock.os, "pwrite", full)
  with pytest.raises(OSError, match="No space left"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  monkeypatch.setattr(workdir_lock.os, "pwrite", real)
  assert _open_fds() == before
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert f"pid {os.getpid()} " in open(lock.path).read()


def test_a_filesystem_without_locks_leaks_no_descriptor(tmp_path, monkeypatch):
  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  before = _open_fds()
  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
  with pytest.raises(OSError, match="No locks available"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert _open_fds() == before


def test_two_locks_of_one_workdir_in_one_process_and_release_on_exception(tmp_path):
  with pytest.raises(KeyError):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} "):
        workdir_lock.WorkdirLock(str(tmp_path / "." / "")).acquire()
      raise KeyError("boom")
  with workdir_lock.WorkdirLock(str(tmp_path)), workdir_lock.WorkdirLock(str(tmp_path / "b")):
    pass  # Two different workdirs are independent.


# ------------------------------------------------------------------ pass@k


def _exact(n, c, k):
  return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def test_ks_given_as_a_generator_are_used_not_used_up():
  """check_ks consumed a generator, then refused it as 'no k in ks=[]'."""
  counts = [(3, 1), (5, 0), (4, 4)]
  got = pak.mean_pass_at_k(counts, (k for k in (1, 2, 3, 4)))
  want = {f"pass@{k}": float(sum(_exact(n, c, k) for n, c in counts) / len(counts))
          for k in (1, 2, 3)}
  assert got == pytest.approx(want, abs=1e-12)
  pak.check_ks((k for k in (1, 9)), 3)  # Some k fits: no error.
  with pytest.raises(ValueError, match=r"ks=\[7, 9\]"):
    pak.check_ks((k for k in (7, 9)), 3)


@pytest.mark.parametrize("n, c, k", [(10_000, 3, 500), (10_000, 9_990, 5), (2_000, 1, 1),
                                     (50, 0, 7), (50, 50, 50)])
def test_pass_at_k_is_exact_for_large_n(n, c, k):
  assert pak.pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-9, abs=1e-15)


# ------------------------------------------------------------------ hardware


def test_bf16_dot_algorithm_gives_the_bfloat16_peak_on_gpu(monkeypatch):
  """Under BF16_BF16_F32 a float32 model's dots run on the tensor cores at the bfloat16
  rate; the TF32 peak (half of it) was used, so the MFU could read up to 200%."""
  monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
                              process_index=0)
  with jax.default_matmul_precision("BF16_BF16_F32"):
    peak, how = hardware.peak_flops("float32", [gpu])
  assert (peak, how) == (989e12, "datasheet NVIDIA H100 80GB HBM3 float32 (bfloat16 matmuls)")
  with jax.default_matmul_precision("float32"):
    assert hardware.peak_flops("float32", [gpu])[0] == 67e12
  assert hardware.peak_flops("float32", [gpu])[0] == 495e12  # JAX's default: TF32.


def test_humaneval_scoring_takes_ks_as_a_generator():
  from blockdiff_jax.evaluation import humaneval
  problems = humaneval.select_problems(humaneval.load_problems(), "0")
  samples = [{"task_id": "HumanEval/0",
              "completion": problems["HumanEval/0"]["canonical_solution"]}]
  summary = humaneval.score_samples(samples, problems, ks=(k for k in (1,)), workers=1)
  assert summary["pass_at_k"] == {"pass@1": 1.0}
