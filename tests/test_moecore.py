"""Hardening of the MoE layer, attention module and upcycling (session 16, moecore)."""

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import attention
from blockdiff_jax.model import moe
from blockdiff_jax.model import upcycle


@pytest.mark.parametrize("field,value", [
    ("expert_dim", 0), ("expert_dim", -3), ("shared_expert_dim", -2),
    ("load_balance_weight", float("nan")), ("load_balance_weight", float("inf")),
    ("load_balance_weight", -0.01), ("z_loss_weight", -1e-3),
    ("z_loss_weight", float("nan"))])
def test_moe_config_names_bad_sizes_and_loss_weights(field, value):
  # Accepted before: the sizes failed at init deep in flax (ZeroDivisionError, negative
  # shape), the weights made the auxiliary loss NaN, inf or rewarded imbalance.
  with pytest.raises(ValueError, match=f"model.moe.{field}"):
    moe.MoEConfig(num_experts=4, **{field: value})


def _dots(jaxpr):
  """Every dot_general equation of a closed jaxpr, nested ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


def test_router_and_shared_gate_logits_are_full_float32_dots():
  # JAX's default precision runs an fp32 dot as TF32 (GPU) or one bf16 pass (TPU): the
  # "fp32 router" had ~3 digits there. A CPU ignores precision, so check the program.
  d, e = 6, 5
  cfg = moe.MoEConfig(num_experts=e, top_k=2, expert_dim=3, shared_expert_dim=4,
                      shared_expert_gate=True, impl="dense")
  layer = moe.MoEFeedForward(cfg, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (1, 4, d))
  meta = masks.make_meta(jnp.arange(4)[None], 2, masks.CLEAN)
  params = layer.init(jax.random.key(1), x, meta)
  closed = jax.make_jaxpr(layer.apply)(params, x, meta)
  router_dots = [q for q in _dots(closed.jaxpr)
                 if q.invars[1].aval.shape in ((d, e), (d, 1))
                 and q.invars[1].aval.dtype == jnp.float32]
  assert len(router_dots) == 2, [q.invars[1].aval for q in _dots(closed.jaxpr)]
  for q in router_dots:
    precision = q.params["precision"]
    assert precision is not None and all(
        p == jax.lax.Precision.HIGHEST for p in precision), precision


@pytest.mark.parametrize("k", [3, 4])
def test_combine_of_identical_bf16_copies_gives_the_copy_back(k):
  # An upcycled model at init: every copy is the dense MLP's output and the weights sum
  # to 1. Rounded to bf16 before the sum, k >= 3 weights moved ~0.5% of the entries.
  n, d = 256, 32
  y = jax.random.normal(jax.random.key(0), (n, d)).astype(jnp.bfloat16)
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (n, 8)))
  w, _ = jax.lax.top_k(probs, k)
  w = w / jnp.sum(w, -1, keepdims=True)
  out = moe.combine(jnp.repeat(y, k, axis=0), w)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(y, np.float32))


def test_bf16_moe_layer_with_identical_experts_routes_like_one_expert():
  # The layer-level view of the combine fix: with E identical experts, top-3 routing
  # must give what top-1 routing (combine weight exactly 1) gives.
  d, f, e = 8, 16, 4
  x = jax.random.normal(jax.random.key(0), (2, 64, d)).astype(jnp.bfloat16)
  meta = masks.make_meta(jnp.arange(64)[None], 4, masks.CLEAN)
  keys = jax.random.split(jax.random.key(2), 3)
  one = [jax.random.normal(kk, s) * s[0] ** -0.5
         for kk, s in zip(keys, [(d, f), (d, f), (f, d)])]
  outs = []
  for k in (1, 3):
    cfg = moe.MoEConfig(num_experts=e, top_k=k, expert_dim=f, impl="ragged_dot")
    layer = moe.MoEFeedForward(cfg, dtype=jnp.bfloat16)
    params = nn.unbox(layer.init(jax.random.key(1), x, meta))["params"]
    params = {**params, "wi_gate": jnp.stack([one[0]] * e),
              "wi_up": jnp.stack([one[1]] * e), "wo": jnp.stack([one[2]] * e)}
    outs.append(np.asarray(layer.apply({"params": params}, x, meta)[0], np.float32))
  np.testing.assert_array_equal(outs[1], outs[0])


def _dense_params(d=4, f=6):
  mlp = {t: {"DenseGeneral_0": {"kernel": np.ones(s, np.float32)}}
         for t, s in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d)))}
  return {"layer_0": {"mlp": mlp}}


@pytest.mark.parametrize("kwargs,match", [
    ({"num_experts": 0}, "num_experts"), ({"num_experts": 2.5}, "num_experts"),
    ({"num_experts": True}, "num_experts"),
    ({"num_experts": 2, "router_std": float("nan")}, "router_std"),
    ({"num_experts": 2, "router_std": float("inf")}, "router_std"),
    ({"num_experts": 2, "router_std": -0.02}, "router_std")])
def test_upcycle_params_names_bad_expert_counts_and_router_std(kwargs, match):
  # Before: 0 experts gave empty expert weights, 2.5 a bare broadcasting error, a NaN/inf
  # std NaN router logits (a NaN model), a negative one passed unnoticed.
  with pytest.raises(ValueError, match=match):
    upcycle.upcycle_params(_dense_params(), **kwargs)


def test_attention_module_refuses_an_unknown_impl():
  x = jnp.ones((1, 4, 8))
  meta = masks.make_meta(jnp.arange(4)[None], 2, masks.CLEAN)
  layer = attention.Attention(num_heads=2, num_kv_heads=1, head_dim=4, impl="palas")
  with pytest.raises(ValueError, match="impl"):
    layer.init(jax.random.key(0), x, meta)
