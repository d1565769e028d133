"""Resume hardening: a failed restore leaves config.json, transient errors do not fall back."""

import os
import shutil

import orbax.checkpoint as ocp
import pytest

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
import test_hardening_checkpoints as checkpoint_tests


# The tiny run and its per-test copy, as the checkpoint hardening tests make them.
_config = checkpoint_tests._config  # pylint: disable=protected-access
trained = checkpoint_tests.trained  # Module fixture: one 4-step run, checkpoints at 2, 4.
workdir = checkpoint_tests.workdir  # A copy of it for each test.


def _steps(workdir):
  return checkpoints.saved_steps(os.path.join(workdir, "checkpoints"))


def _failing_restore(monkeypatch, error, bad_step=4):
  """Orbax restores of ``bad_step`` raise ``error`` (other steps restore)."""
  original = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    if step == bad_step:
      raise error
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)


TRANSIENT = [
    PermissionError(13, "Permission denied", "state/d/0"),
    MemoryError("cannot allocate"),
    ModuleNotFoundError("No module named 'optional_dep'"),
    ValueError("PERMISSION_DENIED: Error reading local file state/d/0"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB"),
    ValueError("Failed to restore item 'state': UNAVAILABLE: storage is not reachable"),
]
IDS = ["permission", "memory", "import", "ts_permission", "device_oom", "wrapped_code"]


def test_a_machine_error_raised_while_handling_another_is_found():
  """An Orbax wrapper raised inside an ``except`` (no ``from``): the cause is its context."""
  try:
    try:
      raise MemoryError("cannot allocate")
    except MemoryError:
      raise ValueError("Failed to restore item 'state'")  # pylint: disable=raise-missing-from
  except ValueError as e:
    assert checkpoints.is_environment_error(e)
  assert not checkpoints.is_environment_error(ValueError("DATA_LOSS: truncated file"))
  assert not checkpoints.is_environment_error(KeyError("params/missing"))


@pytest.mark.parametrize("error", TRANSIENT, ids=IDS)
def test_an_error_of_the_machine_is_raised_not_taken_for_corruption(error):
  calls = []

  def restore_step(step):
    calls.append(step)
    if step == 4:
      raise error
    return "older"
  with pytest.raises(type(error)) as info:
    checkpoints._restore_newest("ckpts", [2, 4], restore_step, explicit=False)
  assert info.value is error and calls == [4]  # No older step was tried.
  assert any("not of the checkpoint" in n for n in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("error", [
    ValueError("DATA_LOSS: Error reading ... checksum mismatch"),
    KeyError("Unknown key: state"),
    checkpoints.CorruptCheckpointError("array params/w differs")],
    ids=["data_loss", "missing_item", "fingerprint"])
def test_a_corrupt_step_still_falls_back(error):
  def restore_step(step):
    if step == 4:
      raise error
    return "older"
  assert checkpoints._restore_newest("ckpts", [2, 4], restore_step, False) == (2, "older")


def test_a_resume_hit_by_a_transient_error_keeps_the_newest_checkpoint(workdir, monkeypatch):
  """It restored step 2 and moved the healthy step 4 into corrupt_checkpoints."""
  error = PermissionError(13, "Permission denied", "state/d/0")
  _failing_restore(monkeypatch, error)
  with pytest.raises(type(error)):
    trainer.run(_config(steps=6), workdir)
  assert _steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_load_for_inference_raises_a_transient_error(workdir, monkeypatch):
  _failing_restore(monkeypatch, PermissionError(13, "Permission denied", "x"))
  with pytest.raises(PermissionError):
    inference.load_for_inference(workdir, use_ema=False)


def _break_every_step(workdir):
  for step in _steps(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.parametrize("kept_before", [False, True])
def test_a_resume_whose_checkpoints_do_not_restore_leaves_config_json(workdir, kept_before):
  """config.json was replaced by the failing run's config (and the run's own moved to
  config.step4.json) before the restore failed: sampling and the next resume then read
  a config that trained nothing."""
  path = os.path.join(workdir, "config.json")
  kept = os.path.join(workdir, "config.step4.json")
  if kept_before:  # An earlier resume kept a copy: config.json is overwritten, not moved.
    shutil.copy(path, kept)
  before = open(path, "rb").read()
  listing = sorted(os.listdir(workdir))
  _break_every_step(workdir)
  c = _config(steps=6)
  c.train.learning_rate = 1e-3  # An allowed change on a resume.
  with pytest.raises(checkpoints.CorruptCheckpointError, match="no checkpoint .* restores"):
    trainer.run(c, workdir)
  assert open(path, "rb").read() == before
  assert sorted(os.listdir(workdir)) == listing


def test_a_restored_resume_still_records_the_changed_config(trained, workdir, monkeypatch):
  """The put-back is for a failed restore only: a resume that restores keeps its config."""
  def stop(*args, **kwargs):
    raise KeyboardInterrupt
  # Stop once the state is restored, before the train step compiles.
  monkeypatch.setattr(trainer.metrics_writer, "MetricsWriter", stop)
  c = _config(steps=6)
  c.train.learning_rate = 1e-3
  with pytest.raises(KeyboardInterrupt):
    trainer.run(c, workdir)
  assert checkpoints.load_config(workdir).train.learning_rate == 1e-3
  with open(os.path.join(workdir, "config.step4.json"), "rb") as f:
    with open(os.path.join(trained, "config.json"), "rb") as g:
      assert f.read() == g.read()


def test_a_run_that_fails_before_its_loop_closes_its_checkpointer(workdir, monkeypatch):
  made = []

  class Spy(checkpoints.Checkpointer):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)
      self.closes = 0

    def close(self):
      self.closes += 1
      super().close()

  def fail(*args, **kwargs):
    raise RuntimeError("compile failed")
  monkeypatch.setattr(checkpoints, "Checkpointer", Spy)
  monkeypatch.setattr(step_lib, "make_sharded_train", fail)
  with pytest.raises(RuntimeError, match="compile failed"):
    trainer.run(_config(steps=6), workdir)
  assert len(made) == 1 and made[0].closes >= 1 and made[0]._closed


def test_a_resume_that_fails_while_compiling_leaves_config_json(workdir, monkeypatch):
  """Before the restore, too: a device out of memory while building the step."""
  path = os.path.join(workdir, "config.json")
  before, listing = open(path, "rb").read(), sorted(os.listdir(workdir))

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
  monkeypatch.setattr(step_lib, "make_sharded_train", out_of_memory)
  c = _config(steps=6)
  c.train.learning_rate = 1e-3  # An allowed change on a resume.
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    trainer.run(c, workdir)
  assert open(path, "rb").read() == before
  assert sorted(os.listdir(workdir)) == listing
