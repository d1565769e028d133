"""Hardening of decoding policies, sampling settings and the hierarchical KV cache.

NaN policy values and non-finite temperatures used to be accepted and decode under a
misleading label; a fractional top_k failed only inside the first sampled decode; the
hierarchical cache broadcast a short buffer write over its whole block buffer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample

NAN, INF = float("nan"), float("inf")


def _select(policy):
  """What ``policy`` accepts among 4 candidates: 3 near-certain ones, then a coin flip."""
  probs = jnp.array([[[0.995, 0.005]] * 3 + [[0.5, 0.5]]])
  entropy, margin = policies.scores(probs)
  conf = jnp.max(probs, axis=-1)
  cand = jnp.ones((1, 4), bool)
  return np.asarray(policy.select(conf, entropy, margin, cand, jnp.array([[4]])))[0]


@pytest.mark.parametrize("name,field", [("entropy", "EntropyBounded.gamma"),
                                        ("factor", "Factor.f")])
def test_nan_policy_value_is_refused_and_inf_accepts_every_candidate(name, field):
  # A NaN passed "gamma < 0" and then accepted one token per step (no sum is <= NaN).
  with pytest.raises(ValueError, match=rf"{field} must be >= 0, got nan"):
    policies.make_policy(name, NAN)
  s = sample.default_sample_config()
  s.policy, s.policy_value = name, NAN
  with pytest.raises(ValueError, match=rf"sample.policy_value=nan .*'{name}'"):
    sample.options_from_config(s, 8, tokenizers.ByteTokenizer())
  # inf is a real setting: no entropy budget / no confidence bar, the whole block at once.
  np.testing.assert_array_equal(_select(policies.make_policy(name, INF)), [1, 1, 1, 1])
  # A finite value still ranks: the three confident candidates, not the coin flip.
  np.testing.assert_array_equal(_select(policies.make_policy(name, 0.1)), [1, 1, 1, 0])


@pytest.mark.parametrize("temperature", [NAN, INF])
def test_non_finite_temperature_is_refused(temperature):
  # NaN drew token 0 with NaN confidence; inf drew the -inf (impossible) token 2.
  with pytest.raises(ValueError, match=rf"sample.temperature must be a finite .*{temperature}"):
    policies.Sampling(temperature=temperature)
  s = sample.default_sample_config()
  s.temperature = temperature
  with pytest.raises(ValueError, match="sample.temperature"):
    sample.options_from_config(s, 8, tokenizers.ByteTokenizer())


def test_large_finite_temperature_never_draws_an_impossible_token():
  logits = jnp.array([[2.0, 1.0, -jnp.inf, 0.5]] * 64)
  tokens, conf, _ = policies.Sampling(temperature=1e6).propose(logits, jax.random.PRNGKey(0))
  assert not np.any(np.asarray(tokens) == 2)
  assert np.all(np.isfinite(np.asarray(conf)))


@pytest.mark.parametrize("top_k", [2.5, NAN, INF])
def test_fractional_top_k_is_refused_up_front(top_k):
  # It used to fail only inside the first sampled decode, as a lax.top_k shape error.
  with pytest.raises(ValueError, match=rf"sample.top_k must be a whole number .*{top_k}"):
    policies.Sampling(temperature=1.0, top_k=top_k)


def test_whole_float_top_k_filters_like_the_int():
  logits = jnp.array([[2.0, 1.0, -jnp.inf, 0.5], [0.0, 3.0, 1.0, 2.0]])
  got = policies.Sampling(temperature=1.0, top_k=2.0)
  _, _, probs = got.propose(logits, jax.random.PRNGKey(0))  # Was a lax.top_k shape error.
  assert got == policies.Sampling(temperature=1.0, top_k=2)
  # numpy reference: softmax over each row's two largest logits.
  x = np.asarray(logits, np.float64)
  keep = x >= np.sort(x, axis=-1)[:, -2:-1]
  want = np.where(keep, np.exp(x - x.max(-1, keepdims=True)), 0.0)
  np.testing.assert_allclose(np.asarray(probs), want / want.sum(-1, keepdims=True), rtol=1e-6)


SPEC = kv_cache.KVSpec(num_layers=2, num_kv_heads=2, head_dim=6)


def _hier_cache(buffer_size=4, capacity=20):
  return hc.HierarchicalKVCache.empty(SPEC, 2, capacity, 4, hc.Hierarchy(1, 4, 4),
                                      buffer_size=buffer_size)


def test_hierarchical_write_buffer_refuses_a_wrong_width_and_writes_the_right_one():
  cache = _hier_cache()
  rng = np.random.default_rng(0)
  short = jnp.asarray(rng.normal(size=(2, 2, 1, 2, 6)), jnp.float32)
  # A 1-slot write was broadcast over all 4 buffer slots (as KVCache's was).
  with pytest.raises(ValueError, match="buffer_size=4 slots, got 1 and 1"):
    cache.write_buffer(short, short, jnp.array([8, 4]), jnp.array([True, True]))
  k = rng.normal(size=(2, 2, 4, 2, 6)).astype(np.float32)
  new = cache.write_buffer(jnp.asarray(k), jnp.asarray(-k), jnp.array([8, 4]),
                           jnp.array([True, False]))
  ring = cache.hierarchy.ring
  np.testing.assert_array_equal(np.asarray(new.ring_k[:, 0, ring:]), k[:, 0])
  np.testing.assert_array_equal(np.asarray(new.ring_v[:, 0, ring:]), -k[:, 0])
  np.testing.assert_array_equal(np.asarray(new.ring_k[:, 1, ring:]), 0.0)  # Row 1 kept.
  np.testing.assert_array_equal(np.asarray(new.buffer_start), [8, 0])


def test_hierarchical_prefill_past_the_capacity_is_refused_by_name():
  cache = _hier_cache(buffer_size=0)
  k = jnp.ones((2, 2, 24, 2, 6))
  with pytest.raises(ValueError, match="prefill of 24 positions exceeds the cache capacity 20"):
    cache.prefill(k, k, jnp.ones((2, 24), bool))
  # The full cache says the same (the decoders treat both caches alike).
  full = kv_cache.KVCache.empty(SPEC, 2, 20, 4)
  with pytest.raises(ValueError, match="prefill of 24 positions exceeds the cache capacity 20"):
    full.prefill(k, k, jnp.ones((2, 24), bool))
