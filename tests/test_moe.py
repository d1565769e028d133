"""MoE routing and dispatch against slow references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import moe


def _weights(key, e, d, f):
  k1, k2, k3 = jax.random.split(key, 3)
  return (jax.random.normal(k1, (e, d, f)) * d ** -0.5,
          jax.random.normal(k2, (e, d, f)) * d ** -0.5,
          jax.random.normal(k3, (e, f, d)) * f ** -0.5)


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
@pytest.mark.parametrize("n,e,k", [(16, 4, 2), (33, 8, 2), (20, 8, 1), (12, 3, 3)])
def test_dropless_dispatch_matches_dense_reference(impl, n, e, k):
  d, f = 8, 16
  cfg = moe.MoEConfig(num_experts=e, top_k=k, expert_dim=f, block_min_experts=k, tile_size=4,
                      impl=impl)
  dense_cfg = moe.MoEConfig(num_experts=e, top_k=k, expert_dim=f, block_min_experts=k,
                            impl="dense")
  x = jax.random.normal(jax.random.key(0), (n, d))
  logits = jax.random.normal(jax.random.key(1), (n, e))
  w, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
  ws = _weights(jax.random.key(2), e, d, f)

  def run(c):
    return lambda x, ws: moe.local_experts(x, idx, w, *ws, c)

  np.testing.assert_allclose(run(cfg)(x, ws), run(dense_cfg)(x, ws), rtol=1e-5, atol=1e-5)
  g1 = jax.grad(lambda x, ws: run(cfg)(x, ws).sum(), argnums=(0, 1))(x, ws)
  g2 = jax.grad(lambda x, ws: run(dense_cfg)(x, ws).sum(), argnums=(0, 1))(x, ws)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dense_reference_matches_per_token_loop():
  e, k, d, f, n = 4, 2, 6, 10, 7
  cfg = moe.MoEConfig(num_experts=e, top_k=k, expert_dim=f, impl="dense")
  x = np.asarray(jax.random.normal(jax.random.key(0), (n, d)))
  idx = np.array([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [0, 2], [3, 1]])
  w = np.asarray(jax.random.uniform(jax.random.key(1), (n, k)))
  wg, wu, wd = (np.asarray(a) for a in _weights(jax.random.key(2), e, d, f))
  silu = lambda z: z / (1 + np.exp(-z))
  want = np.zeros((n, d))
  for i in range(n):
    for j in range(k):
      ex = idx[i, j]
      want[i] += w[i, j] * ((silu(x[i] @ wg[ex]) * (x[i] @ wu[ex])) @ wd[ex])
  got = moe.local_experts(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), wg, wu, wd, cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled", "dense"])
def test_void_rows_give_zeros_and_leave_the_rest_unchanged(impl):
  # Expert-parallel receive buffers mark unfilled slots with id >= G.
  g, d, f, m = 3, 8, 16, 19
  cfg = moe.MoEConfig(num_experts=g, top_k=1, expert_dim=f, block_min_experts=1, tile_size=4,
                      impl=impl)
  xs = np.asarray(jax.random.normal(jax.random.key(0), (m, d)))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (m,), 0, g + 2))
  wg, wu, wd = (np.asarray(a) for a in _weights(jax.random.key(2), g, d, f))
  silu = lambda z: z / (1 + np.exp(-z))
  want = np.stack([np.zeros(d) if i >= g else (silu(x @ wg[i]) * (x @ wu[i])) @ wd[i]
                   for x, i in zip(xs, ids)])
  got = moe.expert_ffn(jnp.asarray(xs), jnp.asarray(ids), wg, wu, wd, cfg)
  assert (ids >= g).sum() >= 3
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def reference_coreset(probs, block_ids, stream, top_k, coverage, min_experts):
  """Per-block dMoE coreset with explicit loops."""
  b, t, e = probs.shape
  allowed = np.zeros((b, t, e), bool)
  for r in range(b):
    for key in set(zip(stream[r], block_ids[r])):
      idx = [i for i in range(t) if (stream[r, i], block_ids[r, i]) == key]
      votes = np.zeros(e)
      for i in idx:
        top = np.argsort(-probs[r, i], kind="stable")[:top_k]
        votes[top] += probs[r, i, top]
      share = votes / votes.sum()
      order = np.argsort(-share, kind="stable")
      keep, acc = [], 0.0
      for rank, ex in enumerate(order):
        if acc >= coverage - 1e-6 and rank >= min_experts:
          break
        keep.append(ex)
        acc += share[ex]
      allowed[r, idx] = False
      for i in idx:
        allowed[r, i, keep] = True
  return allowed


@pytest.mark.parametrize("block_size,coverage,min_experts", [(4, 0.5, 2), (4, 0.9, 2),
                                                             (8, 0.7, 3), (2, 1.0, 2)])
def test_block_coreset_matches_reference(block_size, coverage, min_experts):
  b, length, e = 2, 8, 8
  meta = masks.training_meta(length, block_size, b)
  logits = jax.random.normal(jax.random.key(3), (b, 2 * length, e)) * 2
  probs = jax.nn.softmax(logits)
  got = moe.block_coreset(probs, meta, 2, coverage, min_experts)
  want = reference_coreset(np.asarray(probs), np.asarray(meta.block_ids),
                           np.asarray(meta.stream), 2, coverage, min_experts)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_block_routing_keeps_tokens_inside_the_coreset_and_uses_fewer_experts():
  b, length, e, bs = 2, 32, 16, 8
  meta = masks.training_meta(length, bs, b)
  logits = jax.random.normal(jax.random.key(4), (b, 2 * length, e))
  block_cfg = moe.MoEConfig(num_experts=e, router_mode="block", block_coverage=0.6)
  token_cfg = moe.MoEConfig(num_experts=e, router_mode="token")
  _, _, experts, allowed = moe.route(logits, meta, block_cfg)
  assert np.take_along_axis(np.asarray(allowed), np.asarray(experts), -1).all()
  _, _, token_experts, _ = moe.route(logits, meta, token_cfg)

  def per_block_unique(ex):
    ex = np.asarray(ex).reshape(b, 2 * length // bs, bs * 2)
    return np.mean([len(set(row)) for blk in ex for row in blk])

  assert per_block_unique(experts) < per_block_unique(token_experts)


def test_load_balance_and_z_loss_follow_their_formulas():
  b, t, d, e, k = 1, 6, 4, 4, 2
  cfg = moe.MoEConfig(num_experts=e, top_k=k, expert_dim=8, impl="dense")
  layer = moe.MoEFeedForward(cfg)
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  meta = masks.make_meta(jnp.arange(t)[None], 2, masks.CLEAN)
  params = layer.init(jax.random.key(1), x, meta)
  _, stats = layer.apply(params, x, meta)
  router = np.asarray(params["params"]["router"].unbox())
  logits = np.asarray(x[0]) @ router
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, -1)[:, :k]
  frac = np.bincount(top.ravel(), minlength=e) / (t * k)
  np.testing.assert_allclose(stats["load_balance_loss"], e * np.sum(frac * probs.mean(0)),
                             rtol=1e-5)
  z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats["router_z_loss"], np.mean(z ** 2), rtol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"], np.bincount(top.ravel(), minlength=e))


def test_invalid_moe_configs_name_the_field():
  with pytest.raises(ValueError, match="top_k=5"):
    moe.MoEConfig(num_experts=4, top_k=5)
  with pytest.raises(ValueError, match="router_mode"):
    moe.MoEConfig(num_experts=4, router_mode="sequence")
