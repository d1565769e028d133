"""Hostile workdirs: a second run, corrupt checkpoints, incompatible resumes, re-run steps."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.checkpoint import workdir_lock
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
from conftest import load_config_file


def _config(steps=4):
  cfg = load_config_file("tiny")
  cfg.data.max_bytes = 40_000
  cfg.data.seq_len = 32
  cfg.data.batch_size = 4
  cfg.model.d_model = 32
  cfg.model.moe.expert_dim = 32
  cfg.train.steps = steps
  cfg.train.log_every = 1
  cfg.train.eval_every = 0
  cfg.train.checkpoint_every = 2
  cfg.train.keep_checkpoints = 3
  cfg.train.async_checkpoints = False
  cfg.train.tensorboard = False
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny run of 4 steps with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  trainer.run(_config(), workdir)
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(trained, copy)
  return copy


def _step_dir(workdir, step=4):
  return os.path.join(workdir, "checkpoints", str(step))


def _array_files(workdir, step=4):
  """The OCDBT data files of a step (which one holds the params is Orbax's choice)."""
  files = glob.glob(os.path.join(_step_dir(workdir, step), "state", "**", "d", "*"),
                    recursive=True)
  assert files
  return files


def _truncate(workdir):
  for path in _array_files(workdir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _flip_byte(workdir):
  """One byte flipped in the middle of each data file (past the small headers)."""
  for path in _array_files(workdir):
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      b = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([b[0] ^ 0xFF]))


def _delete_state_metadata(workdir):
  os.remove(os.path.join(_step_dir(workdir), "state", "_METADATA"))


def _garbage_data_metadata(workdir):
  with open(os.path.join(_step_dir(workdir), "data", "metadata"), "w") as f:
    f.write("{not json\x00")


def _delete_state(workdir):
  shutil.rmtree(os.path.join(_step_dir(workdir), "state"))


CORRUPTIONS = [_truncate, _flip_byte, _delete_state_metadata, _garbage_data_metadata,
               _delete_state]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_load_for_inference_falls_back_past_a_corrupt_latest_checkpoint(workdir, corrupt,
                                                                        capsys):
  want = inference.load_for_inference(workdir, step=2, use_ema=False)[3]
  corrupt(workdir)
  got = inference.load_for_inference(workdir, use_ema=False)[3]
  out = capsys.readouterr().out
  assert "checkpoint step 4" in out and "restored checkpoint step 2 instead of step 4" in out
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The loader says which step it fell back to.
  assert inference.load_for_inference(workdir, use_ema=False, return_step=True)[4] == 2


def test_flipped_bits_are_never_loaded_silently(trained, tmp_path):
  """Each flip either fails the restore or hit arrays that are not read (params intact).

  Orbax restores a bit flipped inside a zstd chunk as a silently different number
  (measured on configs/tiny.py: 4 of 8 flips); the saved fingerprints turn those into errors.
  """
  want = inference.load_for_inference(trained, step=4, use_ema=False)[3]
  for k in range(4):
    workdir = str(tmp_path / f"run{k}")
    shutil.copytree(trained, workdir)
    path = sorted(_array_files(workdir), key=os.path.getsize)[-1 - k % 2]
    with open(path, "r+b") as f:
      f.seek(int(os.path.getsize(path) * (0.3 + 0.1 * k)))
      b = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([b[0] ^ 0x01]))
    try:
      got = inference.load_for_inference(workdir, step=4, use_ema=False)[3]
    except checkpoints.CorruptCheckpointError as e:
      assert "step 4" in str(e)
      continue
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_array_that_differs_from_its_saved_fingerprint_is_refused(workdir, capsys):
  """What a silent flip looks like to the restore: arrays whose fingerprint changed."""
  path = os.path.join(_step_dir(workdir), "data", "metadata")
  data = json.load(open(path))
  key = sorted(k for k in data[checkpoints.FINGERPRINT] if k.startswith("params/"))[0]
  data[checkpoints.FINGERPRINT][key] ^= 1
  json.dump(data, open(path, "w"))
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=f"step 4 .*array {key} differs from the one saved"):
    inference.load_for_inference(workdir, step=4, use_ema=False)
  inference.load_for_inference(workdir, use_ema=False)  # Falls back to step 2.
  assert "restored checkpoint step 2 instead of step 4" in capsys.readouterr().out


def test_every_checkpoint_corrupt_is_an_error_naming_each_step(workdir):
  _delete_state(workdir)
  shutil.rmtree(os.path.join(_step_dir(workdir, 2), "state"))
  with pytest.raises(checkpoints.CorruptCheckpointError, match="step 4.*step 2"):
    inference.load_for_inference(workdir, use_ema=False)


def test_training_resumes_from_the_newest_checkpoint_that_restores(workdir, capsys):
  _truncate(workdir)
  rows_before = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows_before] == [1, 2, 3, 4]
  trainer.run(_config(), workdir)
  out = capsys.readouterr().out
  assert "restored checkpoint step 2 instead of step 4" in out
  assert "resumed from step 2" in out
  # Steps 3 and 4 were trained again: their old rows are gone, none repeats.
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[:2] == rows_before[:2]
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  assert checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 4
  inference.load_for_inference(workdir, step=4, use_ema=False)  # The rewritten one restores.


def test_incompatible_resume_names_the_parameter_and_leaves_the_workdir(workdir):
  before = open(os.path.join(workdir, "config.json")).read()
  listing = sorted(os.listdir(workdir))
  cfg = _config(6)
  cfg.model.d_model = 48
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"parameter \S+ has shape \(\d+, 32\).*expects \(\d+, 48\)"):
    trainer.run(cfg, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert sorted(os.listdir(workdir)) == listing


def test_a_second_run_in_the_workdir_fails_naming_the_holder(workdir):
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
      trainer.run(_config(), workdir)


def test_the_lock_names_another_process_and_a_dead_holder_does_not_block(tmp_path):
  workdir = str(tmp_path / "w")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from blockdiff_jax.checkpoint import workdir_lock; "
       "l = workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
       "sys.stdin.read()", workdir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid} "):
      workdir_lock.WorkdirLock(workdir).acquire()
  finally:
    holder.stdin.close()
    holder.wait()
  # The holder is gone; its lock file (naming it) remains but no longer blocks.
  assert f"pid {holder.pid}" in open(os.path.join(workdir, workdir_lock.LOCK_NAME)).read()
  with workdir_lock.WorkdirLock(workdir):
    pass


def test_nan_stop_before_any_checkpoint_says_none_exists(tmp_path, monkeypatch):
  make = step_lib.make_train_step

  def poisoned(*args, **kwargs):
    inner = make(*args, **kwargs)

    def train_step(state, batch, rng):
      poisoned_params = jax.tree.map(lambda p: p * np.nan, state.params)
      return inner(state.replace(params=poisoned_params), batch, rng)
    return train_step

  monkeypatch.setattr(step_lib, "make_train_step", poisoned)
  with pytest.raises(trainer.NonFiniteError, match="no checkpoint has been written yet"):
    trainer.run(_config(), str(tmp_path / "nan"))
