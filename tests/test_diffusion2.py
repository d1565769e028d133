"""Objective options at their edges: every bad field refused by name, before any trace."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses

MASK = 15


@pytest.mark.parametrize("objective", [losses.BlockDiffusionObjective,
                                       fastdllm.FastDLLMObjective])
@pytest.mark.parametrize("block_size", [0, -4, True, 4.0])
def test_objective_refuses_a_block_size_that_is_not_a_positive_integer(objective, block_size):
  # Built outside the config (experiment scripts, notebooks): 0 failed in corrupt() as a
  # ZeroDivisionError, -4 (it divides 8) as an MLIR "invalid tensor dimension size".
  with pytest.raises(ValueError,
                     match=rf"diffusion\.block_size must be an integer >= 1, got {block_size!r}"):
    objective(block_size, MASK)


@pytest.mark.parametrize("objective", [losses.BlockDiffusionObjective,
                                       fastdllm.FastDLLMObjective])
@pytest.mark.parametrize("block_size", [1, 3, 9])
def test_valid_block_sizes_still_mask_per_block(objective, block_size):
  """Odd sizes, 1 and the whole row: t is one value per block (independent loop)."""
  b, length = 4, 9
  obj = objective(np.int64(block_size), MASK, antithetic=False)
  batch = {"tokens": jnp.zeros((b, length), jnp.int32), "loss_mask": jnp.ones((b, length))}
  corrupt = losses.corrupt if objective is losses.BlockDiffusionObjective else fastdllm.corrupt
  out = corrupt(jax.random.key(0), batch, obj)
  is_masked = np.asarray(out[1] if isinstance(out, tuple) else out)
  assert is_masked.shape == (b, length)
  if isinstance(out, tuple):  # BD3: the per-token t is constant inside each block.
    t = np.asarray(out[2])
    for start in range(0, length, block_size):
      block = t[:, start:start + block_size]
      np.testing.assert_array_equal(block, np.repeat(block[:, :1], block.shape[1], axis=1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=2.5), r"diffusion\.isd_stride must be an integer >= 1, got 2\.5"),
    (dict(stride=True), r"diffusion\.isd_stride must be an integer >= 1, got True"),
    (dict(stride=None), r"diffusion\.isd_stride must be an integer >= 1, got None"),
    (dict(stride=4, anchors=1.5), r"diffusion\.isd_anchors must be an integer >= 0, got 1\.5"),
    (dict(stride=4, anchors=True), r"diffusion\.isd_anchors must be an integer >= 0, got True"),
    (dict(stride=4, anchors=None), r"diffusion\.isd_anchors must be an integer >= 0, got None"),
    (dict(stride=4, clean_weight=math.inf),
     r"diffusion\.clean_weight must be a finite number, got inf"),
    (dict(stride=4, clean_weight=None), r"diffusion\.clean_weight must be a number, got None"),
])
def test_introspective_objective_refuses_non_integer_stride_and_anchors(kwargs, message):
  # A stride of 2.5 trained silently with float block ids (noisy blocks at 0, 2.5, 5...);
  # None failed in a bare TypeError naming no field.
  with pytest.raises(ValueError, match=message):
    introspective.IntrospectiveObjective(mask_id=MASK, **kwargs)


def test_introspective_stride_one_and_numpy_ints_are_accepted():
  obj = introspective.IntrospectiveObjective(np.int32(1), MASK, clean_weight=np.float32(0.5),
                                             anchors=np.int64(2))
  # Stride 1: noisy token i is its own block, so it sees the clean tokens < i.
  meta = introspective.training_meta(5, obj.stride)
  np.testing.assert_array_equal(np.asarray(meta.block_ids)[0, :5], np.arange(5))


def _introspective():
  c = config_lib.base_config()
  c.diffusion.objective, c.diffusion.token_shift = "introspective", True
  return c


@pytest.mark.parametrize("field, value, message", [
    ("diffusion.isd_stride", None, r"diffusion\.isd_stride must be an integer >= 1, got None"),
    ("diffusion.isd_stride", True, r"diffusion\.isd_stride must be an integer >= 1, got True"),
    ("diffusion.isd_anchors", None,
     r"diffusion\.isd_anchors must be an integer >= 0, got None"),
    ("diffusion.isd_anchors", True,
     r"diffusion\.isd_anchors must be an integer >= 0, got True"),
    ("diffusion.antithetic", None, r"diffusion\.antithetic must be True or False, got None"),
    ("diffusion.token_shift", None, r"diffusion\.token_shift must be True or False, got None"),
    ("data.seq_len", None, r"data\.seq_len must be an integer, got None"),
])
def test_validate_names_the_bad_field_and_value(field, value, message):
  # Each was accepted (antithetic=None silently turned the stratified noise off, True
  # passed as 1) or failed in a TypeError naming no field ('<' or '-' with None).
  c = _introspective()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    diffusion_config.validate(c)


@pytest.mark.parametrize("objective", ["bd3", "fastdllm", "introspective", "ar"])
def test_validate_accepts_every_objective_with_its_defaults(objective):
  c = config_lib.base_config()
  c.diffusion.objective = objective
  c.diffusion.token_shift = objective != "bd3"
  diffusion_config.validate(c)
  assert diffusion_config.objective(c, MASK) is not None
