"""Hardening tests of the small diffusion building blocks: corruption and the AR objective.

Each test compares with an independent numpy reference (or plain arithmetic), on tiny
shapes, with fixed keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import corruption
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules

VOCAB, MASK = 7, 6


@pytest.mark.parametrize("dtype,mask_id", [(np.uint16, 65536), (np.uint16, 70000),
                                           (np.int8, 200), (np.int32, 65536)])
def test_mask_tokens_keeps_a_mask_id_the_token_dtype_cannot_hold(dtype, mask_id):
  # uint16 token files (the pipeline's own stream dtype) with a 2^16 vocabulary whose
  # MASK is appended at 65536: masked slots must hold the MASK id, not a wrapped one.
  x0 = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype)
  xt, is_masked = corruption.mask_tokens(jax.random.key(0), x0, jnp.ones((2, 4)), mask_id)
  assert bool(jnp.all(is_masked))
  np.testing.assert_array_equal(np.asarray(xt, np.int64), np.full((2, 4), mask_id))


def test_mask_tokens_keeps_narrow_dtype_when_mask_fits_and_refuses_floats():
  x0 = np.array([[1, 2, 3]], np.uint16)
  maskable = jnp.array([[True, False, True]])
  xt, is_masked = corruption.mask_tokens(jax.random.key(1), x0, jnp.ones((1, 3)), 9, maskable)
  assert xt.dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(xt), [[9, 2, 9]])
  np.testing.assert_array_equal(np.asarray(is_masked), [[True, False, True]])
  with pytest.raises(ValueError, match="integer ids"):
    corruption.mask_tokens(jax.random.key(1), x0.astype(np.float32), jnp.ones((1, 3)), 9)


def test_block_diffusion_corrupt_with_uint16_tokens_masks_with_the_mask_id():
  obj = losses.BlockDiffusionObjective(block_size=2, mask_id=65536,
                                       noise=schedules.NoiseRange(0.999, 1.0))
  batch = {"tokens": np.arange(1, 9, dtype=np.uint16).reshape(1, 8),
           "loss_mask": np.ones((1, 8), np.float32)}
  xt, is_masked, _ = losses.corrupt(jax.random.key(0), batch, obj)
  xt, is_masked = np.asarray(xt, np.int64), np.asarray(is_masked)
  assert is_masked.any()
  np.testing.assert_array_equal(xt[is_masked], 65536)
  np.testing.assert_array_equal(xt[~is_masked], batch["tokens"][~is_masked])


def test_block_values_refuses_blocks_short_of_the_length():
  np.testing.assert_array_equal(
      np.asarray(corruption.block_values(jnp.array([[1, 2]]), 5, 3)), [[1, 1, 1, 2, 2]])
  with pytest.raises(ValueError, match="2 blocks of 3 tokens do not cover length 7"):
    corruption.block_values(jnp.array([[1, 2]]), 7, 3)


def _apply(params, x, meta):
  """A position-aware bigram 'model': logits of position i from token i and i itself."""
  return params[x] + 0.1 * meta.positions[..., None], {}


def _reference_ce(w, tokens, loss_mask, seg):
  """Mean next-token CE in float64 over scored tokens, and their count."""
  total, n = 0.0, 0
  for b in range(tokens.shape[0]):
    for i in range(1, tokens.shape[1]):
      if loss_mask[b, i] > 0 and seg[b, i] == seg[b, i - 1] and seg[b, i] >= 0:
        lg = w[tokens[b, i - 1]] + 0.1 * (i - 1)
        lg[MASK] = -np.inf
        logp = lg - (lg.max() + np.log(np.sum(np.exp(lg - lg.max()))))
        total -= logp[tokens[b, i]]
        n += 1
  return total / max(n, 1), n


@pytest.mark.parametrize("seg", [
    [[0, 0, 0, 0, 0, 0]],
    [[0, 0, 1, 1, 1, -1]],
    [[0, 0, 0, -1, -1, -1]],  # Padding (negative segment) under a loss mask of ones.
    [[-1, -1, -1, -1, -1, -1]],
])
def test_autoregressive_loss_never_scores_padding(seg):
  w = np.asarray(jax.random.normal(jax.random.key(0), (VOCAB, VOCAB)), np.float64)
  tokens = np.array([[1, 2, 3, 4, 5, 0]], np.int32)
  seg = np.array(seg, np.int32)
  batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens, np.float32),
           "segment_ids": seg}
  obj = autoregressive.AutoregressiveObjective(mask_id=MASK)
  loss, metrics = autoregressive.autoregressive_loss(
      _apply, jnp.asarray(w, jnp.float32), batch, None, obj)
  want, n = _reference_ce(w, tokens, batch["loss_mask"], seg)
  assert float(metrics[losses.LOSS_TOKENS]) == n
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


def test_autoregressive_loss_length_one_scores_nothing():
  obj = autoregressive.AutoregressiveObjective(mask_id=MASK)
  batch = {"tokens": np.array([[3]], np.int32), "loss_mask": np.ones((1, 1), np.float32)}
  w = jnp.zeros((VOCAB, VOCAB))
  loss, metrics = autoregressive.autoregressive_loss(_apply, w, batch, None, obj)
  assert float(loss) == 0.0 and float(metrics[losses.LOSS_TOKENS]) == 0.0
