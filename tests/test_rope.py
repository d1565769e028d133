"""RoPE scaling against transformers' RoPE initialisation functions and rotary embedding."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.model import rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # pylint: disable=g-import-not-at-top,wrong-import-position
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top,wrong-import-position

# Our type -> transformers' rope_type. transformers has no static NTK-aware type:
# its "dynamic" NTK at length L uses alpha = f L / M - (f - 1) in
# base * alpha^(d / (d - 2)) (M = max_position_embeddings), which equals our static
# alpha = f at L = M (2f - 1) / f; the tests evaluate it there.
HF_TYPE = {"linear": "linear", "ntk": "dynamic", "yarn": "yarn"}


def _hf_config(scaling: rope.RopeScaling, head_dim: int, theta: float) -> LlamaConfig:
  params = {"rope_type": HF_TYPE[scaling.type], "factor": scaling.factor, "rope_theta": theta}
  if scaling.type == "yarn":
    params.update(original_max_position_embeddings=scaling.original_max_position,
                  beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
                  truncate=scaling.truncate)
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(scaling, name) is not None:
        params[name] = getattr(scaling, name)
  # "dynamic" reads max_position_embeddings as its initial length; YaRN ignores it.
  max_pos = scaling.original_max_position
  return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                     max_position_embeddings=max_pos, rope_parameters=params)


def _ntk_length(scaling):
  """The length at which transformers' dynamic NTK uses alpha = factor (see HF_TYPE)."""
  m, f = scaling.original_max_position, scaling.factor
  length = m * (2 * f - 1) / f
  assert length == int(length), "pick original_max_position divisible by the factor"
  return int(length)


def _hf_init(scaling, head_dim, theta):
  seq_len = _ntk_length(scaling) if scaling.type == "ntk" else None
  inv, attention_factor = ROPE_INIT_FUNCTIONS[HF_TYPE[scaling.type]](
      _hf_config(scaling, head_dim, theta), "cpu", seq_len=seq_len)
  return inv.double().numpy(), float(attention_factor)


def _assert_matches_hf(scaling, head_dim, theta):
  inv, factor = rope.inverse_frequencies(head_dim, theta, scaling)
  want_inv, want_factor = _hf_init(scaling, head_dim, theta)
  assert inv.shape == (head_dim // 2,)
  # Both sides are float32; differences are a few ulp of pow().
  np.testing.assert_allclose(np.asarray(inv, np.float64), want_inv, rtol=3e-6, atol=0)
  assert factor == pytest.approx(want_factor, rel=1e-12)


GRID = list(itertools.product(
    ["linear", "ntk", "yarn"],  # type
    [2.0, 4.0, 32.0],  # factor
    [2048, 4096, 131072],  # original_max_position
    [(64, 10000.0), (128, 1e6), (16, 10000.0)],  # (head_dim, theta)
))


@pytest.mark.parametrize("kind,factor,original,dims", GRID)
def test_inverse_frequencies_match_transformers(kind, factor, original, dims):
  head_dim, theta = dims
  _assert_matches_hf(rope.RopeScaling(kind, factor, original), head_dim, theta)


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("betas", [(32.0, 1.0), (16.0, 2.0), (64.0, 0.5)])
@pytest.mark.parametrize("factor", [3.0, 16.0])
def test_yarn_options_match_transformers(truncate, betas, factor):
  scaling = rope.RopeScaling("yarn", factor, 8192, betas[0], betas[1], truncate=truncate)
  _assert_matches_hf(scaling, 128, 500000.0)


@pytest.mark.parametrize("extra", [dict(attention_factor=1.3),
                                   dict(mscale=0.707, mscale_all_dim=0.707),
                                   dict(mscale=1.0, mscale_all_dim=0.5)])
def test_yarn_attention_factor_options_match_transformers(extra):
  scaling = rope.RopeScaling("yarn", 40.0, 4096, **extra)
  _assert_matches_hf(scaling, 64, 10000.0)


def test_yarn_upper_bound_is_clamped_to_head_dim_minus_one():
  # 131k original context, head_dim 64, theta 1e4: the beta_slow index is past
  # d/2 - 1 = 31 (the ramp's end lies beyond the last frequency), so clamping it to
  # d/2 - 1 -- the old behaviour -- steepens the ramp and changes the frequencies.
  head_dim, theta = 64, 10000.0
  scaling = rope.RopeScaling("yarn", 8.0, 131072)
  low, high = rope.yarn_ramp_bounds(head_dim, theta, scaling)
  assert high > head_dim // 2 - 1
  assert high <= head_dim - 1
  inv, _ = rope.inverse_frequencies(head_dim, theta, scaling)
  # An independent float64 evaluation of the YaRN formulas.
  i = np.arange(head_dim // 2)
  base = theta ** (-2.0 * i / head_dim)
  ramp = np.clip((i - low) / (high - low), 0, 1)
  want = base / 8.0 * ramp + base * (1 - ramp)
  np.testing.assert_allclose(np.asarray(inv, np.float64), want, rtol=3e-6)
  old_ramp = np.clip((i - low) / (head_dim // 2 - 1 - low), 0, 1)
  old = base / 8.0 * old_ramp + base * (1 - old_ramp)
  assert np.max(np.abs(old / want - 1)) > 0.3  # The old clamp was far off.


def test_identity_and_factor_one_cases():
  base, factor = rope.inverse_frequencies(32, 10000.0, rope.RopeScaling())
  np.testing.assert_allclose(np.asarray(base), 10000.0 ** (-np.arange(0, 32, 2) / 32),
                             rtol=2e-6)
  assert factor == 1.0
  for kind in ("linear", "ntk", "yarn"):
    inv, f = rope.inverse_frequencies(32, 10000.0, rope.RopeScaling(kind, 1.0))
    np.testing.assert_allclose(np.asarray(inv), np.asarray(base), rtol=2e-6)
    assert f == 1.0


# Not "ntk": transformers' dynamic NTK re-derives its base from each call's length.
@pytest.mark.parametrize("kind,factor", [("yarn", 8.0), ("yarn", 2.0), ("linear", 4.0)])
def test_rotated_q_matches_transformers_rotary_embedding(kind, factor):
  """apply_rope(x) * attention factor == HF's apply_rotary_pos_emb with its cos/sin."""
  from transformers.models.llama import modeling_llama  # pylint: disable=g-import-not-at-top
  head_dim, theta, length = 32, 10000.0, 48
  scaling = rope.RopeScaling(kind, factor, 1024)
  config = _hf_config(scaling, head_dim, theta)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, length, 3, head_dim)).astype(np.float32)
  positions = np.stack([np.arange(length), 5000 + 37 * np.arange(length)])
  emb = modeling_llama.LlamaRotaryEmbedding(config)
  xt = torch.from_numpy(x).transpose(1, 2)  # HF: [B, H, T, D]
  cos, sin = emb(xt, torch.from_numpy(positions))
  want, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos, sin)
  want = want.transpose(1, 2).numpy()
  inv, attn = rope.inverse_frequencies(head_dim, theta, scaling)
  got = rope.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv) * attn
  # Angles up to ~7000 rad in float32: a few 1e-4 of phase error on either side.
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=1e-3)


def test_apply_rope_is_a_relative_rotation():
  # <R(p) q, R(p') k> depends on p - p' only: shift all positions by a constant.
  inv, _ = rope.inverse_frequencies(16, 10000.0, rope.RopeScaling("yarn", 4.0, 256))
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 8, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 8, 1, 16)), jnp.float32)
  pos = jnp.arange(8)[None]
  logits = lambda shift: jnp.einsum("bqhd,bkhd->qk", rope.apply_rope(q, pos + shift, inv),
                                    rope.apply_rope(k, pos + shift, inv))
  np.testing.assert_allclose(np.asarray(logits(0)), np.asarray(logits(777)), atol=2e-4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(type="rope"), "type"), (dict(factor=0.5), "factor"),
    (dict(original_max_position=0), "original_max_position"),
    (dict(beta_slow=0.0), "beta_slow"), (dict(attention_factor=-1.0), "attention_factor")])
def test_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    rope.RopeScaling(**kwargs)
  with pytest.raises(ValueError, match="head_dim"):
    rope.inverse_frequencies(15, 10000.0, rope.RopeScaling())


def test_yarn_temperature_formula():
  assert rope.yarn_attention_factor(rope.RopeScaling("yarn", 32.0)) == pytest.approx(
      0.1 * math.log(32.0) + 1.0)
