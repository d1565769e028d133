"""Hardening tests for evaluation/{routing_sweep,infilling,likelihood,pass_at_k}.py."""

from fractions import Fraction
import math

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import pass_at_k
from blockdiff_jax.evaluation import routing_sweep

VOCAB = 8


# --- routing_sweep ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["blocks", "Block", "tokens", ""])
def test_routing_setting_refuses_unknown_mode(mode):
  # Before: any mode but "token" was routed by block while sweep labelled the row with
  # coverage / min_experts None (they are only reported for mode == "block").
  with pytest.raises(ValueError, match="mode"):
    routing_sweep.RoutingSetting(mode, 0.5, 2)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_block_coverage_outside_unit_interval_is_refused_up_front(p):
  with pytest.raises(ValueError, match="coverage"):
    routing_sweep.RoutingSetting("block", p, 2)
  # The grid refuses it before any setting is evaluated (not after the token baseline).
  with pytest.raises(ValueError, match="coverage"):
    routing_sweep.settings_grid(4, 2, [0.5, p], [2])


def test_settings_grid_dedupes_coverages_and_keeps_edges():
  grid = routing_sweep.settings_grid(4, 2, [0.5, np.float32(0.5), 1.0, 0.5], [2, 3])
  # One row per distinct (p, min): a repeated p is the same routing, evaluated twice.
  assert [(s.mode, s.coverage, s.min_experts) for s in grid] == [
      ("token", 1.0, 0), ("block", 0.5, 2), ("block", 1.0, 2), ("block", 0.5, 3),
      ("block", 1.0, 3)]
  # Token routing ignores its coverage: any value is fine there.
  assert routing_sweep.RoutingSetting("token", 0.0).name == "token"


# --- infilling -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(kinds=()), "kinds"),
    (dict(kinds=[]), "kinds"),
    (dict(per_problem=1.5), "per_problem"),
    (dict(per_problem=2.0), "per_problem"),
    (dict(per_problem=True), "per_problem"),
    (dict(max_span_lines=3.5), "max_span_lines"),
    (dict(max_span_lines=1), "max_span_lines"),
])
def test_infill_options_refuse_values_that_fail_later(kwargs, field):
  # Before: these were accepted; kinds=() built no task ("no tasks to score" after
  # decoding nothing) and a float count failed as a slice / range index.
  with pytest.raises(ValueError, match=field):
    infilling.InfillOptions(**kwargs)


def test_infill_tasks_rebuild_the_solution_with_valid_options():
  problem = {"task_id": "T/0", "prompt": "def f():\n",
             "canonical_solution": "    x = 1\n    # c\n\n    return x",
             "test": "def check(c):\n  assert c() == 1\n", "entry_point": "f"}
  tasks = infilling.make_tasks_for_problem(
      problem, infilling.InfillOptions(per_problem=None, max_span_lines=np.int64(4)))
  # Eligible lines 0 and 3: single-line holes 0 and 3, one multi-line span 0..3.
  assert [t.task_id for t in tasks] == ["T/0/single-line/0-0", "T/0/single-line/3-3",
                                        "T/0/multi-line/0-3"]
  for t in tasks:
    assert t.prefix + t.middle + t.suffix == problem["prompt"] + problem["canonical_solution"]


# --- likelihood ------------------------------------------------------------------


class _Split:
  """A finite split of `rows` fixed rows, read `batch` rows at a time (wrapping)."""

  def __init__(self, tokens, loss_mask, batch, bytes_per_token=2.0):
    self.tokens, self.loss_mask, self.batch = tokens, loss_mask, batch
    self.num_rows = len(tokens)
    self.bytes_per_token = bytes_per_token

  def get_batch(self, i):
    idx = [(i * self.batch + j) % self.num_rows for j in range(self.batch)]
    return {"tokens": jnp.asarray(self.tokens[idx]),
            "loss_mask": jnp.asarray(self.loss_mask[idx])}


def _uniform_apply(params, tokens, meta, logits_slice=None, **_):
  """Uniform logits: every masked token costs log(VOCAB - 1) nats (MASK is excluded)."""
  del params, meta
  length = tokens.shape[1] if logits_slice is None else logits_slice[1] - logits_slice[0]
  return jnp.zeros((tokens.shape[0], length, VOCAB), jnp.float32), {}


def _split(bytes_per_token=2.0):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB - 1, (3, 8)).astype(np.int32)
  loss_mask = np.ones((3, 8), np.float32)
  loss_mask[1] = 0.0  # A row that scores nothing: left out.
  return _Split(tokens, loss_mask, batch=4, bytes_per_token=bytes_per_token)


_OBJ = losses.BlockDiffusionObjective(block_size=4, mask_id=VOCAB - 1)


@pytest.mark.parametrize("bpt", [0.0, -2.0, float("nan"), float("inf"), True])
def test_likelihood_refuses_a_bad_bytes_per_token(bpt):
  # Before: 0 silently dropped bits/byte, -2 reported a negative one, NaN a NaN one.
  with pytest.raises(ValueError, match="bytes_per_token"):
    likelihood.evaluate(_uniform_apply, {}, _split(), _OBJ, 1, 1, bytes_per_token=bpt)


def test_likelihood_split_smaller_than_a_batch_and_dataset_without_bytes():
  res = likelihood.evaluate(_uniform_apply, {}, _split(), _OBJ, 3, 2)
  # Three distinct rows in a batch of four, one scoring nothing: two sequences.
  assert res["sequences"] == 2 and res["scored_tokens"] == 16
  # Bits per byte: the NELBO in bits over the split's 2 bytes per token.
  assert res["bits_per_byte"] == pytest.approx(res["nelbo"] / math.log(2) / 2.0, rel=1e-9)
  assert res["bits_per_byte"] > 0
  # A dataset whose bytes/token is unknown (NaN) gives no bits/byte, not a NaN one.
  res = likelihood.evaluate(_uniform_apply, {}, _split(float("nan")), _OBJ, 1, 1)
  assert "bits_per_byte" not in res and math.isfinite(res["nelbo"])


# --- pass_at_k -------------------------------------------------------------------


def test_pass_at_k_matches_exact_binomials():
  for n in range(1, 13):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
