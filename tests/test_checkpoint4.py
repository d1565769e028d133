"""Metrics rows across a resume, the values and keys they accept, and what checkpoint
errors say: a model.scan_layers mismatch, a restore of a step that was never saved."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_moe_config
from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.model import build
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib


def _config(scan_layers: bool):
  c = small_moe_config(num_layers=2)
  c.model.scan_layers = scan_layers
  return c


def _metrics_path(tmp_path, text: str) -> str:
  path = os.path.join(tmp_path, "metrics.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def test_a_resume_ends_a_whole_last_row_before_appending(tmp_path):
  # A whole row without its newline (a kill between the row and "\n"), nothing to drop:
  # the first row of the resumed run was glued onto it and both became unreadable.
  path = _metrics_path(tmp_path, '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False, keep_through_step=2)
  writer.write(3, {"loss": 0.25})
  writer.close()
  assert metrics_writer.read_rows(path) == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_a_resume_still_drops_later_rows_and_a_torn_one(tmp_path):
  path = _metrics_path(tmp_path, '{"step": 1, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'
                       '{"step": 5, "lo')
  assert metrics_writer.truncate_rows(path, 2) == 2
  with open(path, encoding="utf-8") as f:
    assert f.read() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.parametrize("value", [jnp.array([0.5]), np.array([[0.5]], np.float32),
                                   jnp.array([[0.5]], jnp.bfloat16), np.float32(0.5), 0.5])
def test_write_takes_a_metric_of_size_one_whatever_its_rank(tmp_path, value):
  # numpy 2 refuses float() of a 1-element array that is not 0-d: the log step raised.
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False)
  row = writer.write(7, {"x": value, "skipped": np.zeros(3)})
  writer.close()
  assert row == {"step": 7, "x": 0.5}
  assert metrics_writer.read_rows(os.path.join(tmp_path, "metrics.jsonl")) == [row]


def test_finite_or_none_makes_numpy_keys_json_keys():
  result = {np.int64(3): {np.int32(1): np.float32(0.25)}, "nan": np.float64("nan"),
            np.bool_(True): 1}
  text = json.dumps(metrics_writer.finite_or_none(result), allow_nan=False)
  assert json.loads(text) == {"3": {"1": 0.25}, "nan": None, "true": 1}


def _save_run(workdir: str, config) -> dict:
  """Saves step 5 of a fresh run of ``config`` and its config.json; the params saved."""
  config, model, _ = initial.build_model(config, workdir)
  params = build.init_params(model, seed=3)
  state = state_lib.create(params, optimizer.make_optimizer(config.train), use_ema=False)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
  ckpt.save(5, state, {})
  ckpt.close()
  checkpoints.save_config(config, workdir)
  return params


def test_loading_a_scanned_run_unscanned_names_model_scan_layers(tmp_path):
  workdir = str(tmp_path)
  _save_run(workdir, _config(scan_layers=True))
  # The error named a parameter "missing" (layer_0/...) and not the field behind it.
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"saved with model\.scan_layers=True, the config has "
                           r"model\.scan_layers=False; pass --config\.model\.scan_layers=True"):
    inference.load_for_inference(workdir, _config(scan_layers=False))
  # The config it asks for loads.
  _, model, _, params = inference.load_for_inference(workdir, _config(scan_layers=True))
  assert model.cfg.scan_layers and "stack_0" in params


def test_check_params_fit_names_scan_layers_the_other_way_too():
  trees = {}
  for scan in (False, True):
    model = initial.build_model(_config(scan), None)[1]
    trees[scan] = nn.unbox(build.abstract_params(model))
  with pytest.raises(ValueError, match=r"saved with model\.scan_layers=False, the config has "
                                       r"model\.scan_layers=True"):
    checkpoints.check_params_fit(trees[False], trees[True])
  # A real shape mismatch in the same layout gets no scan_layers hint.
  small = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) * len(x.shape), x.dtype),
                       trees[False])
  with pytest.raises(ValueError, match=r"has shape \(1,") as info:
    checkpoints.check_params_fit(small, trees[False])
  assert "scan_layers" not in str(info.value)


def test_restoring_a_step_never_saved_lists_the_saved_steps(tmp_path):
  state = {"w": jnp.arange(3.0), "step": jnp.int32(4)}
  ckpt = checkpoints.Checkpointer(os.path.join(tmp_path, "checkpoints"), use_async=False)
  ckpt.save(4, state, {"pos": 4})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  try:
    # It was a CorruptCheckpointError ("does not restore"): nothing there is corrupt.
    with pytest.raises(FileNotFoundError, match=r"no step 7 .* \(it has \[4\]\)"):
      ckpt.restore(abstract, step=7)
    restored, data = ckpt.restore(abstract, step=4)
  finally:
    ckpt.close()
  np.testing.assert_array_equal(restored["w"], np.arange(3.0))
  assert data == {"pos": 4}


def test_a_state_with_a_bool_leaf_saves_and_a_flipped_flag_is_caught(tmp_path):
  # The fingerprint's bitcast refused bool: such a state (optax.apply_if_finite keeps a
  # bool flag) could not be saved at all.
  state = {"w": jnp.arange(3.0), "flag": jnp.array([True, False])}
  ckpt = checkpoints.Checkpointer(os.path.join(tmp_path, "checkpoints"), use_async=False)
  try:
    assert ckpt.save(1, state, {})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  np.testing.assert_array_equal(restored["flag"], [True, False])
  saved = {checkpoints.FINGERPRINT: checkpoints.fingerprints(state)}
  with pytest.raises(checkpoints.CorruptCheckpointError, match="array flag differs"):
    checkpoints.verify_fingerprints(dict(state, flag=jnp.array([True, True])), saved)
