"""Held-out NELBO: exact AR NLL at block_size = 1, standard errors, bits per byte."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax import masks
from blockdiff_jax.model import moe
from blockdiff_jax.model import transformer

MASK = 11


@pytest.fixture(scope="module")
def model_and_params():
  cfg = transformer.TransformerConfig(
      vocab_size=12, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=32, moe=moe.MoEConfig(num_experts=4, expert_dim=16, impl="tiled", tile_size=8))
  model = transformer.Transformer(cfg)
  meta = masks.training_meta(8, 1, 1)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), meta)["params"])
  return (lambda p, t, m, **kw: model.apply({"params": p}, t, m, **kw)), params


class _Batches:
  def __init__(self, tokens):
    self.tokens = tokens
    self.bytes_per_token = 1.0

  def get_batch(self, i):
    return {"tokens": self.tokens[i], "loss_mask": jnp.ones(self.tokens[i].shape)}


def test_block_size_one_nelbo_is_the_exact_ar_nll(model_and_params):
  apply_fn, params = model_and_params
  x0 = jax.random.randint(jax.random.key(1), (3, 8), 0, MASK)
  ar = likelihood.autoregressive_nll(apply_fn, params, x0, MASK).mean(-1)
  # t -> 1 masks every single-token block: the estimator has no variance left.
  obj = losses.BlockDiffusionObjective(block_size=1, mask_id=MASK,
                                       noise=schedules.NoiseRange(1 - 1e-7, 1.0))
  batch = {"tokens": x0, "loss_mask": jnp.ones((3, 8))}
  got = likelihood.per_sequence_nelbo(apply_fn, params, batch, jax.random.key(2), obj)
  np.testing.assert_allclose(got, ar, rtol=1e-5)


def test_block_size_one_estimator_is_unbiased_within_its_standard_error(model_and_params):
  apply_fn, params = model_and_params
  tokens = [jax.random.randint(jax.random.key(10 + i), (8, 8), 0, MASK) for i in range(2)]
  ds = _Batches(tokens)
  obj = losses.BlockDiffusionObjective(block_size=1, mask_id=MASK)
  res = likelihood.evaluate(apply_fn, params, ds, obj, num_batches=2, num_samples=32)
  ar = float(jnp.mean(jnp.concatenate(
      [likelihood.autoregressive_nll(apply_fn, params, t, MASK) for t in tokens])))
  assert res["sequences"] == 16 and res["nelbo_stderr"] > 0
  assert abs(res["nelbo"] - ar) < 4 * res["nelbo_stderr"] + 1e-3, (res, ar)
  np.testing.assert_allclose(res["bits_per_byte"], res["nelbo"] / np.log(2))


def test_evaluation_uses_the_unclipped_noise_range():
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=MASK,
                                       noise=schedules.NoiseRange(0.3, 0.8))
  ev = likelihood.evaluation_objective(obj)
  assert ev.noise.beta == obj.schedule.eps and ev.noise.omega == 1.0
