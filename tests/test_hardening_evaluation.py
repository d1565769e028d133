"""Hardening of evaluation measurements against independent references.

Covers the held-out NELBO's per-token normalisation (padding rows, rows of different
scored lengths), the routing sweep's baseline, and the pass@k estimator against a
brute-force enumeration of subsets.
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import pass_at_k
from blockdiff_jax.evaluation import routing_sweep
from blockdiff_jax.model import transformer

MASK = 11


@pytest.fixture(scope="module")
def tiny_apply():
  cfg = transformer.TransformerConfig(vocab_size=12, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=16)
  model = transformer.Transformer(cfg)
  meta = masks.training_meta(8, 4, 1)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), meta)["params"])
  return (lambda p, t, m, **kw: model.apply({"params": p}, t, m, **kw)), params


class _OneBatch:
  """A dataset of one fixed batch, with a known bytes/token."""

  def __init__(self, tokens, loss_mask, bytes_per_token=2.0):
    self.batch = {"tokens": tokens, "loss_mask": loss_mask}
    self.bytes_per_token = bytes_per_token

  def get_batch(self, i):
    del i
    return self.batch


def _reference_sums(apply_fn, params, batch, rng, obj):
  """Per-row summed NELBO (nats) and scored tokens, straight from the per-token terms."""
  terms = losses.per_token_nelbo(apply_fn, params, batch, rng, obj)
  nats = np.where(np.asarray(terms.is_masked), np.asarray(terms.nll * terms.weight), 0.0)
  return nats.sum(-1).astype(np.float64), np.asarray(batch["loss_mask"]).sum(-1)


def test_likelihood_is_token_weighted_and_excludes_padding_rows(tiny_apply):
  """A padding row (loss_mask all 0) is no sequence of 0 nats, and rows weigh by tokens.

  Reference: the training loop's own NELBO (``block_diffusion_loss``: sum over the
  batch / scored tokens) under the same evaluation objective and noise key.
  """
  apply_fn, params = tiny_apply
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, MASK)
  loss_mask = jnp.array([[1.0] * 8, [1, 1, 1, 0, 0, 0, 0, 0], [0.0] * 8, [1.0] * 8])
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=MASK)
  ds = _OneBatch(tokens, loss_mask)
  res = likelihood.evaluate(apply_fn, params, ds, obj, num_batches=1, num_samples=1, seed=5)

  ev = likelihood.evaluation_objective(obj)
  rng = jax.random.fold_in(jax.random.key(5), 0)  # evaluate's key of batch 0, draw 0.
  _, metrics = losses.block_diffusion_loss(apply_fn, params, ds.batch, rng, ev)
  np.testing.assert_allclose(res["nelbo"], float(metrics["nelbo"]), rtol=1e-5)
  assert res["sequences"] == 3 and res["scored_tokens"] == 19
  np.testing.assert_allclose(res["bits_per_byte"], res["nelbo"] / math.log(2) / 2.0, rtol=1e-9)

  # Standard error of the ratio estimator over the three non-empty rows, by numpy.
  nats, n = _reference_sums(apply_fn, params, ds.batch, rng, ev)
  nats, n = nats[n > 0], n[n > 0]
  r = nats.sum() / n.sum()
  se = np.sqrt(np.sum((nats - r * n) ** 2) / (len(n) - 1) / len(n)) / n.mean()
  np.testing.assert_allclose(res["nelbo_stderr"], se, rtol=1e-5)


def test_likelihood_equal_rows_keep_the_per_sequence_mean_and_its_stderr(tiny_apply):
  """With equal scored lengths the token-weighted NELBO is the mean of per-row NELBOs
  and the ratio-estimator standard error is their std / sqrt(rows)."""
  apply_fn, params = tiny_apply
  tokens = jax.random.randint(jax.random.key(2), (4, 8), 0, MASK)
  ds = _OneBatch(tokens, jnp.ones((4, 8)))
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=MASK)
  res = likelihood.evaluate(apply_fn, params, ds, obj, num_batches=1, num_samples=2, seed=0)
  ev = likelihood.evaluation_objective(obj)
  per_row = np.mean([_reference_sums(apply_fn, params, ds.batch,
                                     jax.random.fold_in(jax.random.key(0), s), ev)[0] / 8.0
                     for s in range(2)], axis=0)
  np.testing.assert_allclose(res["nelbo"], per_row.mean(), rtol=1e-5)
  np.testing.assert_allclose(res["nelbo_stderr"], per_row.std(ddof=1) / 2.0, rtol=1e-5)


def test_likelihood_with_nothing_scored_is_refused(tiny_apply):
  apply_fn, params = tiny_apply
  ds = _OneBatch(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 8)))
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=MASK)
  with pytest.raises(ValueError, match="no scored token"):
    likelihood.evaluate(apply_fn, params, ds, obj, num_batches=1, num_samples=1)


def test_routing_sweep_refuses_a_grid_without_the_token_baseline():
  """Ratios are labelled "of token routing"; a block setting first must not be the base."""
  settings = [routing_sweep.RoutingSetting("block", 0.5, 2),
              routing_sweep.RoutingSetting("token")]
  with pytest.raises(ValueError, match="token"):
    routing_sweep.sweep(None, None, [], None, settings)


def test_pass_at_k_matches_brute_force_subsets():
  """1 - C(n-c, k)/C(n, k) against the share of size-k subsets holding a pass."""
  for n in range(1, 8):
    for c in range(n + 1):
      flags = [True] * c + [False] * (n - c)
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(flags, k))
        want = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
  # Large n stays finite and matches exact integer binomials.
  want = 1 - math.comb(187, 100) / math.comb(200, 100)
  assert pass_at_k.pass_at_k(200, 13, 100) == pytest.approx(want, rel=1e-12)
  with pytest.raises(ValueError):
    pass_at_k.pass_at_k(3, 1, 4)  # n < k: undefined, not clipped.
