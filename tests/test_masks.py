"""The block-diffusion attention mask against an independent per-pair reference."""

import numpy as np
import pytest

from blockdiff_jax import masks


def reference_mask(length, block_size, segments=None, causal_noisy=False, causal_clean=False):
  """Slow per-pair rules of BD3-LM over [x_t ; x_0] (2L × 2L)."""
  seg = np.zeros(length, int) if segments is None else np.asarray(segments)
  out = np.zeros((2 * length, 2 * length), bool)
  for i in range(2 * length):
    for j in range(2 * length):
      qi, kj = i % length, j % length
      q_noisy, k_noisy = i < length, j < length
      bq, bk = qi // block_size, kj // block_size
      if seg[qi] != seg[kj]:
        continue
      if q_noisy and k_noisy:
        ok = bq == bk and (not causal_noisy or kj <= qi)
      elif q_noisy:
        ok = bk < bq
      elif k_noisy:
        ok = False
      else:
        ok = bk < bq or (bk == bq and (not causal_clean or kj <= qi))
      out[i, j] = ok
  return out


@pytest.mark.parametrize("length,block_size", [(8, 1), (8, 2), (12, 4), (8, 8), (16, 16)])
@pytest.mark.parametrize("causal_noisy,causal_clean", [(False, False), (True, False),
                                                       (True, True)])
def test_training_mask_matches_reference(length, block_size, causal_noisy, causal_clean):
  meta = masks.training_meta(length, block_size)
  spec = masks.MaskSpec(causal_noisy=causal_noisy, causal_clean=causal_clean)
  got = np.asarray(masks.dense_mask(meta, meta, spec)[0])
  np.testing.assert_array_equal(
      got, reference_mask(length, block_size, None, causal_noisy, causal_clean))


@pytest.mark.parametrize("length,block_size", [(8, 2), (12, 4)])
def test_causal_blocks_make_the_clean_stream_a_causal_lm(length, block_size):
  """With both streams causal inside a block, clean queries see exactly the clean keys at
  or before them, as a causal LM's."""
  meta = masks.training_meta(length, block_size)
  spec = masks.MaskSpec(causal_noisy=True, causal_clean=True)
  clean = np.asarray(masks.dense_mask(meta, meta, spec)[0])[length:, length:]
  np.testing.assert_array_equal(clean, np.tril(np.ones((length, length), bool)))


def test_segments_isolate_documents():
  segs = np.array([0, 0, 0, 1, 1, 1, 1, 2])
  meta = masks.training_meta(8, 2, 1, segs[None])
  got = np.asarray(masks.dense_mask(meta, meta)[0])
  np.testing.assert_array_equal(got, reference_mask(8, 2, segs))


def test_block_size_one_clean_stream_is_causal():
  n = 10
  meta = masks.training_meta(n, 1)
  m = np.asarray(masks.dense_mask(meta, meta)[0])
  np.testing.assert_array_equal(m[n:, n:], np.tril(np.ones((n, n), bool)))


def test_block_size_length_noisy_stream_is_bidirectional():
  n = 10
  meta = masks.training_meta(n, n)
  m = np.asarray(masks.dense_mask(meta, meta)[0])
  assert m[:n, :n].all()
  assert not m[:n, n:].any()  # One block: no earlier clean block exists.


@pytest.mark.parametrize("block_size", [1, 2, 3, 6])
def test_no_clean_token_sees_noise_and_no_noisy_token_sees_its_clean_copy(block_size):
  n = 12
  meta = masks.training_meta(n, block_size)
  m = np.asarray(masks.dense_mask(meta, meta)[0])
  assert not m[n:, :n].any()
  for i in range(n):
    for j in range(n):
      if j // block_size >= i // block_size:
        assert not m[i, n + j], (i, j)


def test_empty_slots_are_never_seen():
  meta = masks.training_meta(4, 2)
  keys = masks.TokenMeta(meta.positions, meta.block_ids, meta.stream,
                         meta.segment_ids.at[:, 5].set(-1), meta.is_summary)
  assert not np.asarray(masks.dense_mask(meta, keys))[0, :, 5].any()


def test_summary_window_layout():
  # Clean tokens of 4 blocks of 2, one summary slot per block appended after them.
  pos = np.r_[np.arange(8), np.arange(4) * 2]
  summary = np.r_[np.zeros(8, bool), np.ones(4, bool)]
  meta = masks.make_meta(pos[None], 2, masks.CLEAN, is_summary=summary[None])
  m = np.asarray(masks.dense_mask(meta, meta, masks.MaskSpec(window_blocks=1))[0])
  for i in range(12):
    for j in range(12):
      bq, bk = pos[i] // 2, pos[j] // 2
      if summary[i]:
        want = bk == bq
      elif summary[j]:
        want = bk < bq - 1
      else:
        want = bq - 1 <= bk <= bq
      assert m[i, j] == want, (i, j)
