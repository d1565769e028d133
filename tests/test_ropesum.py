"""RoPE and summary-token edge cases: inputs that used to pass silently or fail obscurely."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import rope
from blockdiff_jax.model import summary as summary_lib


def _np_yarn_keep(head_dim, theta, original, beta_fast, beta_slow):
  """Fraction of each frequency YaRN keeps unscaled (numpy, truncated bounds)."""
  index = lambda r: head_dim * math.log(original / (r * 2 * math.pi)) / (2 * math.log(theta))
  low, high = max(math.floor(index(beta_fast)), 0), min(math.ceil(index(beta_slow)),
                                                          head_dim - 1)
  return 1.0 - np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)


def test_yarn_refuses_beta_fast_below_beta_slow():
  # Swapped betas invert the ramp: the fastest dimension (index 0, which YaRN keeps)
  # would be fully interpolated and the slowest kept.
  keep = _np_yarn_keep(64, 10000.0, 4096, 1.0, 32.0)
  assert keep[0] == 0.0 and keep[-1] == 1.0
  with pytest.raises(ValueError, match=r"beta_fast must be >= beta_slow.*beta_fast=1.0"):
    rope.RopeScaling(type="yarn", factor=8.0, beta_fast=1.0, beta_slow=32.0)
  with pytest.raises(ValueError, match="beta_fast must be >= beta_slow"):
    rope.scaling_from_config({"type": "yarn", "factor": 4.0, "beta_fast": 2.0,
                              "beta_slow": 4.0})
  # The right order still gives YaRN's ramp (fast dimensions kept, slow interpolated).
  ok = rope.RopeScaling(type="yarn", factor=8.0, original_max_position=4096)
  inv, _ = rope.inverse_frequencies(64, 10000.0, ok)
  base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
  want = _np_yarn_keep(64, 10000.0, 4096, 32.0, 1.0)
  np.testing.assert_allclose(np.asarray(inv), base * want + base / 8.0 * (1 - want),
                             rtol=1e-5)


@pytest.mark.parametrize("x_shape,pos_shape,freqs,match", [
    ((1, 3, 2, 8), (1, 3), 1, r"head_dim 8 needs 4 inverse frequencies.*got 1"),
    ((1, 3, 2, 7), (1, 3), 3, r"head_dim 7 needs 3.5 inverse"),
    ((1, 3, 2, 8), (3,), 4, r"positions \[batch, length\].*\(3,\)"),
])
def test_apply_rope_refuses_mismatched_shapes(x_shape, pos_shape, freqs, match):
  x = jnp.ones(x_shape, jnp.bfloat16)
  positions = jnp.arange(math.prod(pos_shape), dtype=jnp.int32).reshape(pos_shape)
  with pytest.raises(ValueError, match=match):
    rope.apply_rope(x, positions, jnp.full((freqs,), 0.5, jnp.float32))


def _clean_and_noisy(block=4, length=8):
  pos = jnp.arange(length)[None]
  return masks.make_meta(pos, block, masks.CLEAN), masks.make_meta(pos, block, masks.NOISY)


@pytest.mark.parametrize("mode", ["clean", "bd3", "first_block"])
def test_slot_meta_refuses_tokens_that_are_not_clean(mode):
  cfg = summary_lib.SummaryConfig(num_slots=2, window_blocks=1, block_size=4)
  clean, noisy = _clean_and_noisy()
  # clean/first_block: the input flagged NOISY; bd3: the streams swapped ([x_0 ; x_t]).
  bad = clean.concat(noisy) if mode == "bd3" else noisy
  spec = masks.MaskSpec(window_blocks=1)
  slots = cfg.slot_meta(noisy.concat(clean) if mode == "bd3" else clean, mode)
  # What the check prevents: a slot of a NOISY block reads none of its tokens.
  good_view = masks.dense_mask(slots, clean, spec)
  bad_view = masks.dense_mask(slots, noisy, spec)
  assert bool(jnp.any(good_view)) and not bool(jnp.any(bad_view))
  with pytest.raises(ValueError, match=r"must be clean.*stream 0"):
    cfg.slot_meta(bad, mode)
  # A summary slot among the tokens to summarize is refused too.
  marked = clean.__class__(clean.positions, clean.block_ids, clean.stream,
                           clean.segment_ids, clean.is_summary.at[0, 1].set(True))
  meta = noisy.concat(marked) if mode == "bd3" else marked
  with pytest.raises(ValueError, match=r"is_summary True at index \(0, 1\)"):
    cfg.slot_meta(meta, mode)
  # Padding is not checked, and traced metadata still traces.
  padded = clean.__class__(noisy.positions, noisy.block_ids, noisy.stream,
                           jnp.full_like(noisy.segment_ids, -1), noisy.is_summary)
  cfg.slot_meta(noisy.concat(clean) if mode == "bd3" else padded, mode)
  jax.eval_shape(lambda m: cfg.slot_meta(m, mode), bad)


@pytest.mark.parametrize("field,value", [("factor", None), ("beta_fast", None),
                                         ("original_max_position", None),
                                         ("low_freq_factor", "1"), ("factor", True)])
def test_scaling_fields_that_are_not_numbers_are_named(field, value):
  # A null in a config file used to fail a comparison with a TypeError naming no field.
  section = {"type": "yarn" if field in ("beta_fast", "factor") else "llama3", field: value}
  with pytest.raises(ValueError, match=rf"rope_scaling\.{field} must be a number"):
    rope.scaling_from_config(section)
  # The YaRN temperature fields may be None (derived from factor).
  assert rope.RopeScaling(type="yarn", factor=2.0, attention_factor=None, mscale=None,
                          mscale_all_dim=None).attention_factor is None
