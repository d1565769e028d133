"""Reading single parameters of an Orbax checkpoint through tensorstore."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.checkpoint import checkpoints


def _save(tmp_path, dtype):
  rng = np.random.default_rng(0)
  params = {"embed": {"embedding": jnp.asarray(rng.normal(size=(12, 6)), dtype)},
            "layer_0": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(2, 6, 5)), dtype)}}}
  state = {"step": jnp.asarray(3), "params": params,
           "opt_state": {"mu": jnp.ones((12, 6)) * 7.0}}
  directory = os.path.join(tmp_path, "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, use_async=False)
  ckpt.save(3, state, {"position": 0})
  ckpt.close()
  return directory, params


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_read_param_matches_saved(tmp_path, dtype):
  directory, params = _save(tmp_path, dtype)
  assert checkpoints.param_names(directory) == {
      "embed/embedding": ((12, 6), jnp.dtype(dtype).name),
      "layer_0/mlp/kernel": ((2, 6, 5), jnp.dtype(dtype).name)}
  full = checkpoints.read_param(directory, "layer_0/mlp/kernel")
  np.testing.assert_array_equal(full.astype(np.float32),
                                np.asarray(params["layer_0"]["mlp"]["kernel"], np.float32))
  part = checkpoints.read_param(directory, "embed/embedding", np.s_[2:5, 1], step=3)
  np.testing.assert_array_equal(part.astype(np.float32),
                                np.asarray(params["embed"]["embedding"], np.float32)[2:5, 1])
  store = checkpoints.open_param(directory, "embed/embedding")
  assert tuple(store.shape) == (12, 6)
  mu = checkpoints.read_param(directory, "mu", subtree="opt_state")
  np.testing.assert_array_equal(mu, np.full((12, 6), 7.0, np.float32))


def test_read_param_names_the_bad_input(tmp_path):
  directory, _ = _save(tmp_path, jnp.float32)
  with pytest.raises(KeyError, match="no parameter 'mlp/kernel'.*layer_0/mlp/kernel"):
    checkpoints.read_param(directory, "mlp/kernel")
  with pytest.raises(FileNotFoundError, match="no step 9"):
    checkpoints.read_param(directory, "embed/embedding", step=9)
  with pytest.raises(ValueError, match="no 'ema_params'"):
    checkpoints.param_names(directory, subtree="ema_params")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoints.param_names(os.path.join(tmp_path, "missing"))
