"""Training hardening: resume exactness of the whole state, resumes the checkpoint cannot
take (named by their config field), and a schedule that would train nothing."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.data import pipeline
from blockdiff_jax.train import config as train_config
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
from conftest import small_run_config

STEPS, EVERY = 5, 2  # Checkpoints at 2, 4 and 5: the interval does not divide the run.


def _config(steps=STEPS):
  c = small_run_config(steps, checkpoint_every=EVERY, warmup_steps=2)
  c.train.keep_checkpoints = 5
  c.train.grad_accum_steps = 2
  c.train.ema_decay = 0.9
  return c


def _state(workdir, step):
  """Every array of a saved train state (params, Adam moments and count, EMA, step) and
  its data position, read back without a target."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers={checkpoints.STATE: ocp.PyTreeCheckpointHandler(),
                     checkpoints.DATA: ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        checkpoints.STATE: ocp.args.PyTreeRestore(), checkpoints.DATA: ocp.args.JsonRestore()}))
  finally:
    manager.close()
  leaves = jax.tree_util.tree_leaves_with_path(restored[checkpoints.STATE])
  data = {k: v for k, v in restored[checkpoints.DATA].items() if k != checkpoints.FINGERPRINT}
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}, data


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The reference: 5 steps in one go (accumulation, EMA, grad clipping on)."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  trainer.run(_config(), workdir)
  return workdir


@pytest.fixture
def copy(straight, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight, workdir)
  return workdir


class _Crash(Exception):
  pass


def test_a_run_crashed_past_a_checkpoint_resumes_to_the_same_state_and_rows(
    straight, tmp_path, monkeypatch):
  """A crash while fetching step 4's batch (row 3 written, last checkpoint 2),
  then a restart: every array of every checkpoint, the data position and the metric
  rows equal the uninterrupted run's."""
  workdir = str(tmp_path / "run")
  fetch = pipeline.DatasetIterator.__next__

  def crashing_fetch(self):
    if self.get_state()["index"] == 3:
      raise _Crash()
    return fetch(self)

  monkeypatch.setattr(pipeline.DatasetIterator, "__next__", crashing_fetch)
  with pytest.raises(_Crash):
    trainer.run(_config(), workdir)
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]
  monkeypatch.setattr(pipeline.DatasetIterator, "__next__", fetch)
  trainer.run(_config(), workdir)
  for step in (2, 4, 5):
    (want, want_data), (got, got_data) = _state(straight, step), _state(workdir, step)
    assert got_data == want_data == {"index": step}
    assert sorted(got) == sorted(want) and any("ema_params" in k for k in got)
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"step {step} {key}")
  keys = ("loss", "nelbo", "grad_norm", "learning_rate", "finite")
  assert ([[r["step"]] + [r[k] for k in keys] for r in _rows(workdir)] ==
          [[r["step"]] + [r[k] for k in keys] for r in _rows(straight)])
  assert [r["step"] for r in _rows(workdir)] == list(range(1, STEPS + 1))


def test_turning_grad_clip_off_on_resume_is_refused_naming_it(copy):
  """The checkpoint's optimizer state holds clip_by_global_norm's slot; without it the
  restore failed for every step and was reported as corruption."""
  before = open(os.path.join(copy, "config.json")).read()
  listing = sorted(os.listdir(copy))
  c = _config(steps=9)
  c.train.grad_clip = 0.0
  with pytest.raises(ValueError, match=r"cannot resume .*checkpoint step 5.*\n  "
                     r"train\.grad_clip: 1\.0 -> 0\.0 \(turned on or off"):
    trainer.run(c, copy)
  assert open(os.path.join(copy, "config.json")).read() == before
  assert sorted(os.listdir(copy)) == listing
  # Why: the two optimizers' states have other structures.
  params = {"w": jnp.ones((2, 2))}
  on, off = _config(), _config()
  off.train.grad_clip = 0.0
  assert (jax.tree.structure(optimizer.make_optimizer(on.train).init(params)) !=
          jax.tree.structure(optimizer.make_optimizer(off.train).init(params)))


def test_another_clip_threshold_on_resume_is_allowed(copy, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("reached compilation")
  monkeypatch.setattr(step_lib, "make_sharded_train", refuse)
  c = _config(steps=9)
  c.train.grad_clip = 0.5
  with pytest.raises(AssertionError, match="reached compilation"):
    trainer.run(c, copy)
  # Put back as config.json: the resume failed before its checkpoint restored.
  refused, allowed = train_config.resume_changes(
      json.load(open(os.path.join(copy, "config.json"))), c)
  assert refused == [] and "train.grad_clip: 1.0 -> 0.5" in allowed


def test_a_resume_with_another_architecture_names_the_config_field(copy):
  c = _config(steps=9)
  c.model.d_model = 48
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"(?s)parameter \S+ has shape .*expects .*"
                     r"config\.json:\n  model\.d_model: 32 -> 48"):
    trainer.run(c, copy)


def test_lora_on_a_run_whose_newest_checkpoint_is_corrupt_falls_back_to_the_previous(
    straight, copy):
  """init_from a plain run, newest step's metadata lost: its step 4 EMA weights plus fresh
  adapters (B = 0). Whether the run had adapters was asked of the broken step alone, so
  the fallback looked for adapters in step 4 and failed as "another architecture"."""
  os.remove(os.path.join(copy, "checkpoints", str(STEPS), "state", "_METADATA"))
  c = _config()
  c.model.lora.rank, c.model.lora.gated, c.train.trainable = 2, False, "lora"
  c.init_from.workdir = copy
  c, model, _ = initial.build_model(c, None)
  params = initial.initial_params(c, model, None)
  want, _ = _state(straight, 4)
  adapters = 0
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    key = jax.tree_util.keystr(path)
    if "lora_" in key:
      adapters += 1
      assert "lora_a" in key or not np.asarray(value).any(), key
    else:
      np.testing.assert_array_equal(np.asarray(value), want["['ema_params']" + key], key)
  assert adapters


def test_a_one_step_run_that_would_train_at_learning_rate_0_is_refused():
  c = _config(steps=1)
  c.train.min_lr_ratio = 0.0
  # What the refusal prevents: the only update's learning rate is 0.
  assert float(optimizer.learning_rate_schedule(c.train)(jnp.int32(0))) == 0.0
  with pytest.raises(ValueError, match=r"train\.steps=1 with train\.min_lr_ratio=0\.0"):
    train_config.validate(c)
  c.train.min_lr_ratio = 0.1
  train_config.validate(c)
  assert float(optimizer.learning_rate_schedule(c.train)(jnp.int32(0))) > 0
