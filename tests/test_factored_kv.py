"""Factored K/V banks: expanded like a numpy reference, read per layer like their dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.model import factored_kv
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import logits as logits_lib

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def _np_rope(x, positions, inv_freq):
  """Half-split RoPE of x [T, H, D] by positions [T] (numpy, float64)."""
  ang = positions[:, None] * np.asarray(inv_freq)[None]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("layers,sinks,rope", [(0, 0, False), (2, 3, True), (1, 4, True)])
def test_dense_matches_a_numpy_reference(layers, sinks, rope):
  rng = np.random.default_rng(layers * 10 + sinks)
  b, g, h, c, r, d = 2, 3, 2, 4, 2, 8
  lead = (layers,) if layers else ()
  arr = lambda *s: rng.normal(size=lead + s).astype(np.float32)
  ka, kb, va, vb = arr(b, g, h, c, r), arr(b, g, h, r, d), arr(b, g, h, c, r), arr(b, g, h, r, d)
  sk, sv = arr(b, sinks, h, d), arr(b, sinks, h, d)
  inv_freq = (1.0, 0.5, 0.1, 0.01) if rope else None
  bank = factored_kv.FactoredKV(*map(jnp.asarray, (ka, kb, va, vb, sk, sv)), inv_freq=inv_freq)
  assert bank.num_positions == g * c
  k, v = (np.asarray(x) for x in bank.dense())
  for idx in np.ndindex(*lead, b):
    want_k = np.einsum("ghcr,ghrd->gchd", ka[idx], kb[idx]).reshape(g * c, h, d)
    want_v = np.einsum("ghcr,ghrd->gchd", va[idx], vb[idx]).reshape(g * c, h, d)
    if rope:
      want_k = _np_rope(want_k, np.arange(g * c, dtype=np.float64), inv_freq)
    want_k[:sinks], want_v[:sinks] = sk[idx], sv[idx]
    np.testing.assert_allclose(k[idx], want_k, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[idx], want_v, atol=1e-5, rtol=1e-5)


def _hierarchical_view(model, params, n, hierarchy, batch=2, seed=0):
  """A cache of n prompt tokens (rows of different lengths) and the last token's meta."""
  fn = logits_lib.ModelLogits(model)
  ids = jax.random.randint(jax.random.key(seed), (batch, n + 1), 3, 200)
  pos = jnp.broadcast_to(jnp.arange(n), (batch, n))
  _, (k, v), _ = fn(params, ids[:, :n], masks.make_meta(pos, 1, masks.CLEAN))
  lengths = jnp.asarray([n, n - 5][:batch])
  valid = jnp.arange(n)[None] < lengths[:, None]
  cache = hc.HierarchicalKVCache.empty(fn.kv_spec, batch, n + 1, 1, hierarchy)
  cache = cache.prefill(k, v, valid)
  last = masks.make_meta(lengths[:, None], 1, masks.CLEAN)
  return fn, ids[:, n:], last, cache


@pytest.mark.parametrize("scan", [False, True])
def test_model_reads_the_factored_bank_like_its_dense_expansion(scan):
  """Each layer expands its own slice of the bank (scanned or looped layers)."""
  model, _ = build.build_model(small_model_config(num_layers=3, scan_layers=scan))
  params = build.init_params(model, 0)
  hy = hc.Hierarchy(window=1, chunk=8, rank=2, sinks=1)
  fn, tok, last, cache = _hierarchical_view(model, params, 45, hy)
  assert int(cache.compressed[1]) >= 2  # Rows read factored chunks (and a sink).
  view = cache.attention_view()
  assert view["factored"] is not None and view["k"].shape[2] == hy.ring
  got = fn(params, tok, last, view)[0]
  want = fn(params, tok, last, hc.dense_view(view))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  # The bank matters: dropping it (its positions masked off) changes the logits.
  hidden = {**hc.dense_view(view)}
  seg = hidden["meta"].segment_ids
  cut = view["k"].shape[2]
  hidden["meta"] = hidden["meta"].replace(segment_ids=seg.at[:, cut:].set(-1))
  assert np.abs(np.asarray(fn(params, tok, last, hidden)[0] - want)).max() > 1e-3


def test_per_layer_expansion_shrinks_the_forward_transient():
  """Compiled scratch memory of one decode forward: factored bank against all layers
  expanded before the forward (what a view built outside the model costs)."""
  model, _ = build.build_model(small_model_config(num_layers=4, scan_layers=True))
  params = build.init_params(model, 0)
  hy = hc.Hierarchy(window=1, chunk=64, rank=2, sinks=0)
  fn, tok, last, cache = _hierarchical_view(model, params, 2048, hy, batch=1)

  def temp_bytes(expand_first):
    def step(p, t, m, c):
      view = c.attention_view()
      return fn(p, t, m, hc.dense_view(view) if expand_first else view)[0]
    compiled = jax.jit(step).lower(params, tok, last, cache).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense, factored = temp_bytes(True), temp_bytes(False)
  spec = fn.kv_spec
  one_layer_kv = 2 * 2048 * spec.num_kv_heads * spec.head_dim * 4
  # Expanding every layer first holds all 4 layers' K/V; per layer, about one.
  assert dense >= 4 * one_layer_kv, (dense, one_layer_kv)
  assert factored < dense / 2, (factored, dense)
