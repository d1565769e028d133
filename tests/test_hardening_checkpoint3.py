"""Starting from and loading runs: LoRA on another run (init_from), the LoRA settings a
run trained with, and a hand-broken config.json; errors name the field or file."""

import json
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config_file
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.model import build
from blockdiff_jax.model import lora
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib
from blockdiff_jax.train import trainer

SOURCE_STEP = 5


def _config(lora_rank: int = 0):
  c = load_config_file("tiny")
  c.data.max_bytes = 40_000
  c.data.seq_len = 32
  c.data.batch_size = 2
  c.model.d_model = 32
  c.model.num_layers = 1
  c.model.moe.expert_dim = 32
  c.train.steps = 1
  c.train.learning_rate = 1e-2
  c.train.eval_every = 0
  c.train.checkpoint_every = 1
  c.train.async_checkpoints = False
  c.train.tensorboard = False
  if lora_rank:
    c.model.lora.rank = lora_rank
    c.model.lora.gated = False
    c.train.trainable = "lora"
  return c


def _save_run(workdir: str, config, params):
  """A run's checkpoint of ``params`` at SOURCE_STEP (Adam's count too), written directly."""
  state = state_lib.create(params, optimizer.make_optimizer(config.train), use_ema=False)
  state = state.replace(step=jnp.int32(SOURCE_STEP), opt_state=jax.tree.map(
      lambda x: jnp.full_like(x, SOURCE_STEP) if x.dtype == jnp.int32 else x, state.opt_state))
  ckpt = checkpoints.Checkpointer(f"{workdir}/checkpoints", use_async=False)
  ckpt.save(SOURCE_STEP, state, {})
  ckpt.close()
  return params


def _flat(tree):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("plain_run"))
  model = initial.build_model(_config(), None)[1]
  return workdir, _save_run(workdir, _config(), build.init_params(model, seed=3))


@pytest.fixture(scope="module")
def lora_start(plain_run):
  """(LoRA config, model, initial_params, MASK id) of a LoRA start from ``plain_run``."""
  c = _config(lora_rank=2)
  c.init_from.workdir = plain_run[0]
  c, model, tokenizer = initial.build_model(c, None)
  return c, model, initial.initial_params(c, model, None), tokenizer.mask_id


def test_lora_on_a_run_without_adapters_starts_from_its_weights_and_fresh_adapters(
    plain_run, lora_start):
  """The run's base weights bit for bit plus adapters with B = 0 (the starting model is
  the run's own) and a random A (so B gets a gradient)."""
  c, model, params, _ = lora_start
  got, want = _flat(params), _flat(plain_run[1])
  adapters = {name for name in got if lora.is_lora_path(name.split("/"))}
  assert adapters and set(got) - adapters == set(want)
  for name, value in got.items():
    if name.endswith("lora_b"):
      np.testing.assert_array_equal(value, np.zeros_like(value), err_msg=name)
    elif name.endswith("lora_a"):
      assert np.all(np.isfinite(value)) and np.std(value) > 1e-3, name
    else:
      np.testing.assert_array_equal(value, want[name], err_msg=name)

  c = c.copy_and_resolve_references()
  c.init_from.step = SOURCE_STEP + 2
  with pytest.raises(ValueError, match=rf"init_from.step={SOURCE_STEP + 2}.*has \[{SOURCE_STEP}\]"):
    initial.initial_params(c, model, None)


@pytest.fixture(scope="module")
def lora_run(lora_start, tmp_path_factory):
  """(workdir, config, params) of a LoRA run whose adapters trained (B is no longer 0)."""
  c, _, params, _ = lora_start
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.25 if p[-1].key == "lora_b" else x + 1.0, params)
  c = c.copy_and_resolve_references()
  c.init_from.workdir = ""
  checkpoints.save_config(c, workdir)
  return workdir, c, _save_run(workdir, c, params)


def test_lora_on_a_lora_run_keeps_its_trained_adapters(lora_start, lora_run):
  c, model, _, _ = lora_start
  workdir, _, params = lora_run
  source = _flat(params)
  c = c.copy_and_resolve_references()
  c.init_from.workdir = workdir
  got = _flat(initial.initial_params(c, model, None))
  assert set(got) == set(source)
  for name, value in got.items():
    np.testing.assert_array_equal(value, source[name], err_msg=name)


@pytest.mark.parametrize("field,value", [("alpha", 64.0), ("gated", True)])
def test_inference_refuses_another_lora_scale_or_gating_than_the_run_trained(
    lora_start, lora_run, field, value):
  """Neither is in the checkpoint's shapes: the adapters would restore into another
  function (another scale; or acting on MASK tokens only) without any error."""
  workdir, c, params = lora_run
  kept = inference.load_for_inference(workdir, c, merge_lora=False)[3]
  for name, want in _flat(params).items():
    np.testing.assert_array_equal(_flat(kept)[name], want, err_msg=name)
  c = c.copy_and_resolve_references()
  c.model.lora[field] = value
  c.model.lora.mask_id = lora_start[3]  # A valid gate: only the new check can refuse.
  with pytest.raises(ValueError, match=rf"model.lora.{field}={c.model.lora[field]!r}.*pass "
                     rf"--config.model.lora.{field}="):
    inference.load_for_inference(workdir, c)


def test_a_lora_run_from_another_run_trains_only_adapters_from_step_0(plain_run, tmp_path):
  """One trained step: the checkpoint is at step 1 with Adam's count 1 (a fresh optimizer,
  not the source's at SOURCE_STEP), the base weights are still the source's exactly and
  the adapters moved."""
  workdir, source = plain_run
  c = _config(lora_rank=2)
  c.init_from.workdir = workdir
  out = str(tmp_path / "lora_on_top")
  trainer.run(c, out)
  directory = f"{out}/checkpoints"
  saved = checkpoints.Checkpointer(directory, use_async=False)
  assert saved.latest_step() == 1
  saved.close()
  counts = [checkpoints.read_param(directory, name, subtree="opt_state")
            for name in checkpoints.param_names(directory, subtree="opt_state")
            if name.endswith("count")]
  assert counts and all(int(n) == 1 for n in counts)
  want = _flat(source)
  moved = 0.0
  for name in checkpoints.param_names(directory):
    value = checkpoints.read_param(directory, name)
    if lora.is_lora_path(name.split("/")):
      moved = max(moved, float(np.abs(value).max()) if name.endswith("lora_b") else 0.0)
    else:
      np.testing.assert_array_equal(value, want[name], err_msg=name)
  assert moved > 1e-4


@pytest.mark.parametrize("edit,message", [
    pytest.param(lambda text: text[:len(text) // 2], "is not valid JSON", id="truncated"),
    pytest.param(lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                          if k != "data"}),
                 "has no 'data' section", id="no_data_section"),
])
def test_a_config_json_broken_by_hand_is_named_with_its_path(tmp_path, edit, message):
  checkpoints.save_config(_config(), str(tmp_path))
  path = tmp_path / "config.json"
  path.write_text(edit(path.read_text()))
  with pytest.raises(ValueError, match=f"{re.escape(str(path))} {message}"):
    inference.load_for_inference(str(tmp_path))
