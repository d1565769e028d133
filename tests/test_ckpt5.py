"""Checkpoints that change on disk under a Checkpointer (another writer, a step deleted by
hand, a save cut short) and a config.json written before newer model fields existed."""

import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_moe_config
from test_checkpoint4 import _save_run as save_run
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.model import build
from blockdiff_jax.model import config as model_config
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib


def _state(offset: float):
  return {"w": jnp.arange(3.0) + offset, "step": jnp.int32(offset)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_a_step_another_checkpointer_saved_is_seen(tmp_path):
  directory = os.path.join(tmp_path, "checkpoints")
  reader = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  try:
    reader.save(1, _state(1.0), {"pos": 1})
    writer = checkpoints.Checkpointer(directory, keep=3, use_async=False)
    writer.save(2, _state(2.0), {"pos": 2})
    writer.close()
    # Orbax's manager caches its listing: step 2 was invisible to the first one.
    assert reader.latest_step() == 2
    restored, data = reader.restore(_abstract(_state(0.0)))
    assert data == {"pos": 2}
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 2.0)
    restored, data = reader.restore(_abstract(_state(0.0)), step=2)
    assert data == {"pos": 2}
  finally:
    reader.close()


def test_a_step_deleted_by_hand_during_the_restore_falls_back(tmp_path, capsys):
  directory = os.path.join(tmp_path, "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  try:
    ckpt.save(1, _state(1.0), {"pos": 1})
    ckpt.save(2, _state(2.0), {"pos": 2})
    real_restore = ckpt.manager.restore

    def restore_after_delete(step, *args, **kwargs):
      if step == 2:  # Gone between the listing and the read.
        shutil.rmtree(os.path.join(directory, "2"))
      return real_restore(step, *args, **kwargs)

    ckpt.manager.restore = restore_after_delete
    # Moving the vanished step "aside" raised FileNotFoundError after step 1 restored.
    restored, data = ckpt.restore(_abstract(_state(0.0)))
    ckpt.manager.restore = real_restore
    assert data == {"pos": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 1.0)
    assert ckpt.latest_step() == 1
    assert ckpt.save(2, _state(5.0), {"pos": 5})  # The step can be written again.
  finally:
    ckpt.close()
  assert "moved corrupt" not in capsys.readouterr().out
  assert not os.path.exists(os.path.join(tmp_path, "corrupt_checkpoints", "2"))


def test_a_step_with_only_an_unfinished_save_is_named_so(tmp_path):
  directory = os.path.join(tmp_path, "checkpoints")
  state = _state(1.0)
  ckpt = checkpoints.Checkpointer(directory, use_async=False)
  ckpt.save(1, state, {})
  ckpt.close()
  os.makedirs(os.path.join(directory, "7.orbax-checkpoint-tmp-1700000000", "state"))
  match = r"no step 7 .*\(it has \[1\]\); its save never finished: .*7\.orbax-checkpoint-tmp"
  with pytest.raises(FileNotFoundError, match=match):
    checkpoints.restore_params(directory, _abstract(state)["w"], step=7, subtree="w")
  ckpt = checkpoints.Checkpointer(directory, use_async=False)
  try:
    with pytest.raises(FileNotFoundError, match=match):
      ckpt.restore(_abstract(state), step=7)
    # A step with no folder at all keeps the short message.
    with pytest.raises(FileNotFoundError, match=r"no step 8 .*\(it has \[1\]\)$"):
      ckpt.restore(_abstract(state), step=8)
  finally:
    ckpt.close()


def _config():
  return small_moe_config(num_layers=1)


@pytest.mark.parametrize("dropped", [("moe", "expert_parallel"), ("moe", "block_coverage"),
                                     ("qk_norm",), ("rope_scaling",)])
def test_a_config_json_older_than_a_model_field_loads(tmp_path, dropped, capsys):
  workdir = str(tmp_path)
  params = save_run(workdir, _config())
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  section = saved["model"]
  for name in dropped[:-1]:
    section = section[name]
  del section[dropped[-1]]  # As a version before the field existed wrote it.
  with open(path, "w", encoding="utf-8") as f:
    json.dump(saved, f)
  # It was a bare AttributeError/KeyError naming only the field's last part.
  loaded, _, _, got = inference.load_for_inference(workdir)
  field = "model." + ".".join(dropped)
  assert field in capsys.readouterr().out
  want = flax.traverse_util.flatten_dict(params)
  got = flax.traverse_util.flatten_dict(got)
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value))
  section = loaded.model
  for name in dropped:
    section = section[name]
  want_default = model_config.default_model_config()
  for name in dropped:
    want_default = want_default[name]
  if isinstance(want_default, dict) or hasattr(want_default, "to_dict"):
    assert section.to_dict() == want_default.to_dict()
  else:
    assert section == want_default


def test_init_from_another_architecture_names_the_differing_fields(tmp_path):
  source = str(tmp_path / "source")
  config, model, _ = initial.build_model(_config(), source)
  state = state_lib.create(build.init_params(model, seed=3),
                           optimizer.make_optimizer(config.train), use_ema=False)
  ckpt = checkpoints.Checkpointer(os.path.join(source, "checkpoints"), use_async=False)
  ckpt.save(5, state, {})
  ckpt.close()
  checkpoints.save_config(config, source)
  c = _config()
  c.model.num_layers = 2
  c.model.num_kv_heads = 1
  c.init_from.workdir = source
  c, model, _ = initial.build_model(c, None)
  # Only the first parameter's shape was named, not the fields that make it differ.
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"its config\.json has model\.num_layers=1 \(the config has 2\), "
                           r"model\.num_kv_heads=2 \(the config has 1\)$"):
    initial.initial_params(c, model, None)
