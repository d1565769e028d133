"""Hardening: gmm group sizes as lists, the plan's shared expert and capacity, MoE config
checks and the layouts upcycling accepts."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import expert_parallel
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import moe
from blockdiff_jax.model import upcycle
from blockdiff_jax.train import plan
from pallas_kernels import gmm
from test_hardening_plan import _compiled_temp_bytes
from test_hardening_plan import _config

SIZES = [3, 0, 4]  # Rows 7 of 8 are the zero group.


def _by_hand(lhs, rhs, sizes):
  """Row groups of lhs times their rhs (gmm) and lhs_g^T @ lhs_g (tgmm), in numpy."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, t_out, start = np.zeros((lhs.shape[0], rhs.shape[2])), [], 0
  for g, n in enumerate(sizes):
    out[start:start + n] = lhs[start:start + n] @ rhs[g]
    t_out.append(lhs[start:start + n].T @ lhs[start:start + n])
    start += n
  return out, np.stack(t_out)


@pytest.mark.parametrize("kind", [list, tuple])
def test_gmm_takes_group_sizes_as_a_list(kind):
  """The docstring's "[G] integer rows per group" from a list: every path used to raise
  AttributeError ('list' object has no attribute 'shape' / 'astype' / 'ndim')."""
  lhs = jax.random.normal(jax.random.key(0), (8, 16))
  rhs = jax.random.normal(jax.random.key(1), (3, 16, 16))
  want, t_want = _by_hand(lhs, rhs, SIZES)
  sizes = kind(SIZES)
  for got in (gmm.gmm(lhs, rhs, sizes), gmm.gmm_reference(lhs, rhs, sizes)):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  for got in (gmm.tgmm(lhs, lhs, sizes), gmm.tgmm_reference(lhs, lhs, sizes)):
    np.testing.assert_allclose(np.asarray(got), t_want, atol=1e-4)
  # And refused as clearly as an array is.
  with pytest.raises(ValueError, match=r"gmm: group_sizes must be >= 0, got \[3, -1, 4\]"):
    gmm.gmm(lhs, rhs, kind([3, -1, 4]))
  with pytest.raises(ValueError, match="tgmm: group_sizes must be integer"):
    gmm.tgmm(lhs, lhs, kind([3.0, 0.0, 4.0]))


def _shared(shared_dim, **over):
  c = _config(vocab=32, d_model=32)
  c.model.num_layers, c.model.moe.expert_dim = 2, 16
  c.model.moe.shared_expert_dim = shared_dim
  c.data.seq_len, c.data.batch_size = 32, 2
  for k, v in over.items():
    setattr(c.model, k, v)
  return c


def test_plan_counts_the_shared_expert_activations():
  """The shared expert's SwiGLU runs on every token of every MoE layer; the plan's
  activations ignored ``moe.shared_expert_dim`` (a 1024-wide one: 0.2x XLA's scratch)."""
  mesh = mesh_lib.abstract_mesh(mesh_lib.single_device_mesh_config(), 1)
  acts = lambda c: plan.activation_bytes(model_config.model_config(c), c, mesh, ())
  base, wide = acts(_shared(0)), acts(_shared(1024))
  # By hand: [b, 2L, 3F] fp32 (gate, up, their product) per layer kept for the backward,
  # forward value and gradient in the one layer's working set.
  hidden = 2 * (2 * 32) * 3 * 1024 * 4
  assert wide["saved"] - base["saved"] == 2 * hidden
  assert wide["layer"] - base["layer"] == 2 * hidden
  # With remat only each layer's input is kept: no change there.
  remat = lambda d: acts(_shared(d, remat=True))["saved"]
  assert remat(1024) == remat(0)
  c = _shared(1024)
  total = sum(v for k, v in plan.plan(c)["bytes"].items() if k.startswith("activations"))
  ratio = total / _compiled_temp_bytes(c)
  assert 0.6 < ratio < 1.25, ratio


def test_plan_capacity_is_make_plans():
  """capacity_factor=1.1, 120 tokens a device, top-3 of 8 experts over 2 expert shards:
  1.1 * 120 * 3 / 2 is 198 slots to make_plan and was 199 to the plan (float rounding of
  cf * (n * k) against (cf * n) * k)."""
  c = config_lib.base_config()
  c.model.vocab_size, c.model.d_model, c.model.num_layers = 64, 32, 1
  c.model.num_heads = c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.moe.num_experts, c.model.moe.top_k, c.model.moe.expert_dim = 8, 3, 16
  c.data.seq_len, c.data.batch_size, c.diffusion.block_size = 60, 2, 4
  c.mesh = mesh_lib.default_mesh_config()
  c.mesh.expert, c.mesh.fsdp = 2, 1
  mesh, rules = mesh_lib.abstract_mesh(c.mesh, 2), mesh_lib.logical_rules(c.mesh)
  with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
    want = expert_parallel.make_plan((1, 2 * 60, 32), 8, 3, 16, 1.1).capacity

  def layer(cf):
    c.model.moe.capacity_factor = cf
    return plan.activation_bytes(model_config.model_config(c), c, mesh, rules)["layer"]

  # The working set is linear in the capacity C: 2 (value, gradient) x ep x C slots of
  # 3F hidden + 2D in/out + 2D send buffers, fp32; a tiny factor gives C = 1.
  per_slot = 2 * 2 * (3 * 16 + 4 * 32) * 4
  got, rest = divmod(layer(1.1) - layer(1e-9), per_slot)
  assert rest == 0
  assert (want, 1 + got) == (198, 198)


@pytest.mark.parametrize("field,value", [("first_dense_layers", 1), ("moe_every", 2),
                                         ("shared_expert_dim", 32),
                                         ("shared_expert_gate", True)])
def test_upcycle_refuses_a_layout_it_would_overwrite(field, value):
  """Upcycling makes every layer MoE with no shared expert; a config asking for dense
  layers or a shared expert was silently reset to that layout."""
  m = model_config.default_model_config()
  m.moe.num_experts = 0
  m.moe[field] = value
  with pytest.raises(ValueError, match=f"model.moe.{field}={value!r} cannot be kept"):
    upcycle.upcycle_model_config(m, 4)
  # The config check names it before any checkpoint is read.
  c = config_lib.base_config()
  c.model.vocab_size = 64
  c.init.pretrained = "HuggingFaceTB/SmolLM2-135M"
  c.model.moe.upcycle_from_dense = True
  model_config.validate(c)  # The default layout is upcycling's own.
  c.model.moe[field] = value
  with pytest.raises(ValueError, match=f"model.moe.{field}={value!r} cannot be kept"):
    model_config.validate(c)
  # The accepted layout still upcycles.
  m.moe[field] = dict(upcycle.FIXED_FIELDS)[field]
  upcycle.upcycle_model_config(m, 4)
  assert (m.moe.num_experts, m.moe.expert_dim) == (4, m.mlp_dim)



@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_capacity_factor_must_be_finite(value):
  """inf passed both checks and the plan (as the all-to-all dispatch) died in math.ceil
  with OverflowError; NaN passed MoEConfig and silently meant dropless."""
  with pytest.raises(ValueError, match=r"model\.moe\.capacity_factor must be >= 0 and finite"):
    moe.MoEConfig(num_experts=4, capacity_factor=value)
  c = _config()
  c.model.moe.capacity_factor = value
  with pytest.raises(ValueError, match=r"model\.moe\.capacity_factor must be >= 0 and finite"):
    plan.plan(c)
