"""Summary-token edge cases: block alignment of the slots' clean tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import summary as summary_lib


def _slot_reference(positions, block, slots):
  """Slot positions and block ids by hand: each block's last position, S times."""
  pos = np.asarray(positions)
  ends = pos[..., block - 1::block]
  return np.repeat(ends, slots, -1), np.repeat(ends // block, slots, -1)


@pytest.mark.parametrize("mode,streams", [("clean", 1), ("bd3", 2), ("first_block", 1)])
def test_slot_meta_of_aligned_input_sits_at_each_block_end(mode, streams):
  cfg = summary_lib.SummaryConfig(num_slots=2, window_blocks=1, block_size=4)
  pos = jnp.arange(8)[None] + 4  # starts at block 1: aligned
  clean = masks.make_meta(pos, 4, masks.CLEAN)
  meta = clean if streams == 1 else masks.make_meta(pos, 4, masks.NOISY).concat(clean)
  got = cfg.slot_meta(meta, mode)
  want_pos, want_blk = _slot_reference(pos[:, :4] if mode == "first_block" else pos, 4, 2)
  np.testing.assert_array_equal(got.positions, want_pos)
  np.testing.assert_array_equal(got.block_ids, want_blk)


@pytest.mark.parametrize("mode,streams", [("clean", 1), ("bd3", 2), ("first_block", 1)])
def test_slot_meta_refuses_an_input_starting_inside_a_block(mode, streams):
  # Positions 2..9 with B = 4: token groups straddle blocks 0|1 and 1|2, so the
  # slots would take block 1's third position (5) and block 0 would get none.
  cfg = summary_lib.SummaryConfig(num_slots=2, window_blocks=1, block_size=4)
  pos = jnp.arange(8)[None] + 2
  clean = masks.make_meta(pos, 4, masks.CLEAN)
  meta = clean if streams == 1 else masks.make_meta(pos, 4, masks.NOISY).concat(clean)
  want = r"block-aligned.*block_size=4.*tokens 0\.\.3 of row 0 .*\[0, 0, 1, 1\]"
  with pytest.raises(ValueError, match=want):
    cfg.slot_meta(meta, mode)
  # Traced metadata cannot be checked and still traces.
  jax.eval_shape(lambda m: cfg.slot_meta(m, mode), meta)


def test_slot_meta_leaves_padding_out_of_the_alignment_check():
  # 6 real tokens then 2 pads at position 0 (block 0): eager and jit must agree.
  cfg = summary_lib.SummaryConfig(num_slots=2, window_blocks=1, block_size=4)
  pos = jnp.array([[0, 1, 2, 3, 4, 5, 0, 0]])
  seg = jnp.array([[0, 0, 0, 0, 0, 0, -1, -1]])
  meta = masks.make_meta(pos, 4, masks.CLEAN, seg)
  eager = cfg.slot_meta(meta, "clean")
  traced = jax.jit(lambda m: cfg.slot_meta(m, "clean"))(meta)
  np.testing.assert_array_equal(eager.positions, traced.positions)
  np.testing.assert_array_equal(eager.block_ids, traced.block_ids)
  # A real token of another block inside a group is still refused.
  seg = seg.at[0, 6].set(0)
  with pytest.raises(ValueError, match=r"tokens 4\.\.7 of row 0"):
    cfg.slot_meta(masks.make_meta(pos, 4, masks.CLEAN, seg), "clean")
