"""Decoding policies on hand-made confidences, sampling filters and option validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import policies


def _select(policy, conf, candidates=None, entropy=None, margin=None):
  conf = jnp.asarray(conf, jnp.float32)[None]
  cand = jnp.ones_like(conf, bool) if candidates is None else jnp.asarray(candidates)[None]
  entropy = jnp.zeros_like(conf) if entropy is None else jnp.asarray(entropy, jnp.float32)[None]
  margin = jnp.zeros_like(conf) if margin is None else jnp.asarray(margin, jnp.float32)[None]
  slots = jnp.sum(cand, axis=-1, keepdims=True)
  return np.asarray(policy.select(conf, entropy, margin, cand, slots))[0]


def test_threshold_accepts_confident_positions():
  got = _select(policies.Threshold(0.8), [0.9, 0.5, 0.85, 0.1])
  np.testing.assert_array_equal(got, [True, False, True, False])


def test_threshold_accepts_at_least_the_best_candidate():
  got = _select(policies.Threshold(0.99), [0.3, 0.6, 0.5], candidates=[True, False, True])
  np.testing.assert_array_equal(got, [False, False, True])


def test_threshold_one_accepts_exactly_one_even_at_probability_one():
  got = _select(policies.Threshold(1.0), [1.0, 1.0, 0.2])
  assert got.sum() == 1 and got[0]


def test_threshold_never_picks_non_candidates():
  got = _select(policies.Threshold(0.0), [0.9, 0.9, 0.9], candidates=[False, True, False])
  np.testing.assert_array_equal(got, [False, True, False])


def test_factor_rule():
  # Sorted confidences 0.95, 0.9, 0.7, 0.6 with f=0.5: thresholds 1-f/(n+1) are
  # 0.75, 0.833, 0.875, 0.9 -> n=1 (0.95) and n=2 (0.9) pass, n=3 (0.7) fails.
  got = _select(policies.Factor(0.5), [0.7, 0.95, 0.6, 0.9])
  np.testing.assert_array_equal(got, [False, True, False, True])


def test_factor_accepts_one_when_rule_fails():
  got = _select(policies.Factor(0.1), [0.2, 0.4, 0.3])
  np.testing.assert_array_equal(got, [False, True, False])


def test_topk_static_schedule():
  # 8 slots in 4 steps -> 2 per step: the two most confident candidates.
  conf = [0.1, 0.8, 0.3, 0.9, 0.2, 0.5, 0.4, 0.05]
  got = _select(policies.TopK(4), conf)
  np.testing.assert_array_equal(np.flatnonzero(got), [1, 3])


def test_entropy_bounded():
  entropy = [0.3, 0.05, 0.5, 0.1]
  # Ascending: 0.05, 0.1 (cum 0.15), 0.3 (cum 0.45) <= 0.5, then 0.5 (cum 0.95) > 0.5.
  got = _select(policies.EntropyBounded(0.5), [0.5] * 4, entropy=entropy)
  np.testing.assert_array_equal(got, [True, True, False, True])


def test_entropy_bounded_accepts_lowest_when_all_exceed():
  got = _select(policies.EntropyBounded(0.01), [0.5] * 3, entropy=[0.4, 0.2, 0.9])
  np.testing.assert_array_equal(got, [False, True, False])


def test_margin():
  got = _select(policies.Margin(0.5), [0.5] * 4, margin=[0.6, 0.1, 0.5, 0.49])
  np.testing.assert_array_equal(got, [True, False, True, False])


def test_left_to_right_accepts_only_the_leftmost_candidate():
  got = _select(policies.LeftToRight(), [0.1, 0.99, 0.2, 0.3],
                candidates=[False, True, True, False])
  np.testing.assert_array_equal(got, [False, True, False, False])
  assert not _select(policies.LeftToRight(), [0.5, 0.5], candidates=[False, False]).any()


def test_scores_entropy_and_margin():
  probs = jnp.array([[0.7, 0.2, 0.1, 0.0]])
  entropy, margin = policies.scores(probs)
  expected = -sum(p * np.log(p) for p in (0.7, 0.2, 0.1))
  np.testing.assert_allclose(entropy, [expected], rtol=1e-5)
  np.testing.assert_allclose(margin, [0.5], rtol=1e-5)


def test_greedy_proposal_and_confidence():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  toks, conf, _ = policies.Sampling().propose(logits, jax.random.key(0))
  assert int(toks[0]) == 1
  np.testing.assert_allclose(conf, [0.6], rtol=1e-5)


def test_greedy_confidence_is_the_models_probability_whatever_top_k_or_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  for s in (policies.Sampling(top_k=1), policies.Sampling(top_p=0.5)):
    toks, conf, probs = s.propose(logits, jax.random.key(0))
    assert int(toks[0]) == 1
    np.testing.assert_allclose(conf, [0.6], rtol=1e-5)
    np.testing.assert_allclose(probs, [[0.1, 0.6, 0.3]], rtol=1e-5)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept_k = policies.Sampling(temperature=1.0, top_k=2).filter_logits(logits) > -1e29
  np.testing.assert_array_equal(kept_k, [[True, True, False, False]])
  kept_p = policies.Sampling(temperature=1.0, top_p=0.8).filter_logits(logits) > -1e29
  np.testing.assert_array_equal(kept_p, [[True, True, False, False]])
  samples = jax.vmap(lambda k: policies.Sampling(1.0, top_k=2).propose(logits, k)[0])(
      jax.random.split(jax.random.key(1), 64))
  assert set(np.unique(samples).tolist()) <= {0, 1}


@pytest.mark.parametrize("fn", [
    lambda x: policies.scores(jax.nn.softmax(x, axis=-1))[1],
    lambda x: policies.Sampling(temperature=1.0, top_k=40).filter_logits(x)],
    ids=["margin", "top_k_filter"])
def test_top_k_is_not_compiled_as_a_full_sort(fn):
  """The margin and top-k filter read a top-k's values; XLA must not sort the vocabulary."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 4096))
  hlo = jax.jit(fn).lower(x).compile().as_text()
  assert " sort(" not in hlo
  np.testing.assert_allclose(policies.top_k_values(x, 3),
                             -np.sort(-np.asarray(x), axis=-1)[..., :3], rtol=0)


@pytest.mark.parametrize("name,value,cls", [("threshold", 0.7, policies.Threshold),
                                            ("factor", 1.0, policies.Factor),
                                            ("topk", 2, policies.TopK),
                                            ("entropy", 0.3, policies.EntropyBounded),
                                            ("margin", 0.2, policies.Margin),
                                            ("l2r", None, policies.LeftToRight),
                                            ("l2r", 0.9, policies.LeftToRight)])
def test_make_policy(name, value, cls):
  assert isinstance(policies.make_policy(name, value), cls)


@pytest.mark.parametrize("make,match", [
    (lambda: policies.make_policy("greedy", 1.0), "greedy"),
    (lambda: policies.Threshold(1.5), "1.5"),
    (lambda: policies.TopK(0), "TopK.steps"),
    (lambda: policies.Sampling(temperature=-1.0), "temperature"),
    (lambda: policies.Sampling(top_p=0.0), "top_p"),
    (lambda: decoder.DecodeOptions(8, 259, 258, sub_block_size=3), "sub_block_size=3"),
    (lambda: decoder.DecodeOptions(8, 259, 258, edit_threshold=2.0), "edit_threshold"),
])
def test_invalid_options_name_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()
