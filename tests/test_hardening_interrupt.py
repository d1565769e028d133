"""A training run stopped by SIGTERM/SIGINT saves the step it reached and resumes exactly."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import pipeline
from blockdiff_jax.train import trainer
from conftest import load_config_file
from conftest import ROOT
from conftest import XLA_CACHE_OPTIONS

# Checkpoints at steps 2 and 4: a stop after step 3 is past the last periodic one. A
# dense one-layer model keeps tracing and compiling short.
OVERRIDES = {
    "data.max_bytes": 40_000, "data.seq_len": 32, "data.batch_size": 4,
    "model.d_model": 32, "model.num_layers": 1, "model.moe.num_experts": 0,
    "train.steps": 4, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "train.tensorboard": False,
}
PAUSED = "paused before the batch of step"

# The real CLI, paused inside the data iterator while it fetches the batch of step
# ``index + 1`` (past the loop's check for a stop) until its stdin closes: a signal sent
# then lands while that step is in flight, whatever the machine's load. The pause polls:
# a signal the kernel hands to another thread does not interrupt a blocking read of the
# main thread, which alone runs Python's handlers.
CLI_PAUSED_IN_A_STEP = """
import runpy, select, sys
from blockdiff_jax.data import pipeline
index = int(sys.argv.pop(1))
fetch = pipeline.DatasetIterator.__next__
def paused_fetch(self):
  if self.get_state()["index"] == index:
    print("%s", index + 1, flush=True)
    while not select.select([sys.stdin], [], [], 0.05)[0]:
      pass
  return fetch(self)
pipeline.DatasetIterator.__next__ = paused_fetch
runpy.run_module("blockdiff_jax.main", run_name="__main__", alter_sys=True)
""" % PAUSED


def _config():
  cfg = load_config_file("tiny")
  for key, value in OVERRIDES.items():
    *parents, name = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[name] = value
  return cfg


def _params(workdir):
  return jax.tree.leaves(inference.load_for_inference(workdir, use_ema=False)[3])


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _saved_steps(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return list(ckpt.manager.all_steps())
  finally:
    ckpt.close()


def _callers_handler(signum, frame):
  """Stands for a handler the caller of ``run`` had installed (a notebook's, pytest's)."""
  _callers_handler.calls.append(signum)
  del frame


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: 4 steps in one go (its compiled programs fill the XLA cache the
  subprocess reads)."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  trainer.run(_config(), workdir)
  return workdir


def test_sigterm_saves_the_step_in_flight_and_the_resume_matches_a_straight_run(
    uninterrupted, tmp_path):
  """The CLI gets SIGTERM while step 3 is in flight (step 2 has the last periodic
  checkpoint), then SIGINT while it stops: it saves step 3 and exits 143; running again
  ends where the uninterrupted run did."""
  workdir = str(tmp_path / "run")
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             **{k.upper(): str(v) for k, v in XLA_CACHE_OPTIONS.items()})
  proc = subprocess.Popen(
      [sys.executable, "-c", CLI_PAUSED_IN_A_STEP, "2", "--mode=train",
       "--config=configs/tiny.py", f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  out = []

  def read_until(prefix):
    for line in proc.stdout:
      out.append(line)
      if line.startswith(prefix):
        return line
    raise AssertionError(f"no line starting {prefix!r}:\n" + "".join(out))

  try:
    assert read_until(PAUSED).split()[-1] == "3"
    proc.send_signal(signal.SIGTERM)
    read_until("SIGTERM received")
    # A second signal (Ctrl-C) while stopping is ignored, not a second way out.
    proc.send_signal(signal.SIGINT)
    read_until("SIGINT ignored: already stopping")
    proc.stdin.close()
    rest = proc.stdout.read()
    proc.wait()
  finally:
    proc.kill()
    proc.wait()
  out = "".join(out) + rest
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert ("interrupted by SIGTERM at step 3: checkpoint saved in "
          f"{os.path.join(workdir, 'checkpoints')}; run the same command to resume") in out
  assert _saved_steps(workdir) == [2, 3]
  straight_rows = _rows(uninterrupted)
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]

  # The same command again resumes from step 3. Both processes run the same XLA
  # programs (same flags, one compilation cache), so on the CPU results are bit-identical.
  trainer.run(_config(), workdir)
  for a, b in zip(_params(uninterrupted), _params(workdir), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
  assert _saved_steps(workdir) == [2, 3, 4]


def test_a_signal_in_process_raises_with_the_exit_code_and_restores_the_callers_handler(
    uninterrupted, tmp_path, monkeypatch):
  """SIGTERM (raised in this process) while step 2 fetches its batch: the step finishes,
  its periodic checkpoint stands, ``run`` raises instead of exiting the interpreter, and
  the caller's handler is back, never called."""
  workdir = str(tmp_path / "run")
  # What a save cut short by kill -9 leaves (tests/test_hardening_interrupt.py's
  # test_a_save_cut_short_leaves_a_folder_the_next_run_removes makes a real one).
  unfinished = os.path.join(workdir, "checkpoints", "7.orbax-checkpoint-tmp")
  os.makedirs(unfinished)
  fetch = pipeline.DatasetIterator.__next__

  def fetch_then_signal(self):
    if self.get_state()["index"] == 1:
      signal.raise_signal(signal.SIGTERM)
    return fetch(self)

  monkeypatch.setattr(pipeline.DatasetIterator, "__next__", fetch_then_signal)
  _callers_handler.calls = []
  previous = signal.signal(signal.SIGTERM, _callers_handler)
  try:
    with pytest.raises(SystemExit) as stopped:  # A TrainingInterrupted.
      trainer.run(_config(), workdir)
    assert signal.getsignal(signal.SIGTERM) is _callers_handler
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert _callers_handler.calls == []
  assert isinstance(stopped.value, trainer.TrainingInterrupted)
  assert (stopped.value.code, stopped.value.step) == (128 + signal.SIGTERM, 2)
  assert str(stopped.value).startswith(
      "interrupted by SIGTERM at step 2: checkpoint already saved in ")
  assert _saved_steps(workdir) == [2]
  assert not os.path.exists(unfinished)
  straight = _rows(uninterrupted)
  assert [(r["step"], r["loss"]) for r in _rows(workdir)] == [
      (r["step"], r["loss"]) for r in straight[:2]]


def test_a_save_cut_short_leaves_a_folder_the_next_run_removes(tmp_path, monkeypatch):
  """A save that dies before its rename (a crash, ``kill -9``) leaves Orbax's temporary
  folder; only the run holding the workdir removes it, and the last complete step stays."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  ckpt.save(1, {"w": np.ones(8, np.float32)}, {"index": 1})

  class Crash(Exception):
    pass

  async def crash_before_the_rename(self, *args, **kwargs):
    raise Crash()

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize",
                      crash_before_the_rename)
  with pytest.raises(Crash):
    ckpt.save(2, {"w": np.full(8, 2, np.float32)}, {"index": 2})
  monkeypatch.undo()
  left = [name for name in os.listdir(directory) if name != "1"]
  assert len(left) == 1 and left[0].startswith("2.orbax-checkpoint-tmp"), left
  # A reader (evaluate.py opens one while a run may be saving) leaves it alone.
  checkpoints.Checkpointer(directory).close()
  assert sorted(os.listdir(directory)) == sorted(["1", left[0]])
  resumed = checkpoints.Checkpointer(directory, keep=3, use_async=False,
                                     remove_unfinished=True)
  assert sorted(os.listdir(directory)) == ["1"]
  assert resumed.latest_step() == 1
  resumed.close()
