"""Decoder caches at their edges: writes at and past the end, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import summary_bank

SPEC = kv_cache.KVSpec(num_layers=2, num_kv_heads=1, head_dim=2)


def _kv(rng, batch, t):
  """Random K/V [L, B, t, H, D] (distinct values, so a misplaced slot shows)."""
  shape = (SPEC.num_layers, batch, t, SPEC.num_kv_heads, SPEC.head_dim)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _np_commit(ref_k, ref_v, ref_valid, k, v, start, rows, capacity):
  """Numpy reference: slot p of a writing row gets the entry of position p if p < capacity."""
  for b in range(k.shape[1]):
    if not rows[b]:
      continue
    for j in range(k.shape[2]):
      p = start[b] + j
      if 0 <= p < capacity:
        ref_k[:, b, p], ref_v[:, b, p], ref_valid[b, p] = k[:, b, j], v[:, b, j], True


@pytest.mark.parametrize("buffer_size", [0, 4])
def test_commit_past_capacity_drops_the_overflow(buffer_size):
  # Row 0 commits positions 6..9 of a capacity-8 cache, row 1 positions 2..5, row 2 idles
  # at 7. A clamped dynamic_update_slice put position 6's K/V in slot 4 (and 8's in slot
  # 6), or with a buffer wrote positions 8, 9 into the block buffer.
  rng = np.random.default_rng(0)
  cap, b, t = 8, 3, 4
  cache = kv_cache.KVCache.empty(SPEC, b, cap, 4, buffer_size=buffer_size)
  k0, v0 = _kv(rng, b, cap)
  cache = cache.prefill(jnp.asarray(k0), jnp.asarray(v0), jnp.ones((b, cap), bool))
  if buffer_size:
    bk, bv = _kv(rng, b, buffer_size)
    cache = cache.write_buffer(jnp.asarray(bk), jnp.asarray(bv), jnp.full((b,), 8),
                               jnp.ones((b,), bool))
  ref_k, ref_v = np.asarray(cache.k).copy(), np.asarray(cache.v).copy()
  ref_valid = np.asarray(cache.valid).copy()
  k, v = _kv(rng, b, t)
  start, rows = np.array([6, 2, 7]), np.array([True, True, False])
  got = jax.jit(lambda c, *a: c.commit(*a))(cache, jnp.asarray(k), jnp.asarray(v),
                                            jnp.asarray(start, jnp.int32), jnp.asarray(rows))
  _np_commit(ref_k, ref_v, ref_valid, k, v, start, rows, cap)
  np.testing.assert_array_equal(np.asarray(got.k), ref_k)
  np.testing.assert_array_equal(np.asarray(got.v), ref_v)
  np.testing.assert_array_equal(np.asarray(got.valid), ref_valid)


def test_commit_at_any_start_matches_numpy():
  # Per-row starts anywhere in [-2, capacity], some rows not writing, `exists` limiting
  # which slots become valid; the K/V of every slot in range is that position's entry.
  rng = np.random.default_rng(1)
  cap, b, t = 12, 6, 3
  cache = kv_cache.KVCache.empty(SPEC, b, cap, 3)
  ref_k, ref_v = np.zeros(cache.k.shape, np.float32), np.zeros(cache.v.shape, np.float32)
  ref_valid = np.zeros((b, cap), bool)
  for _ in range(4):
    k, v = _kv(rng, b, t)
    start = rng.integers(-2, cap + 1, size=b)
    rows = rng.random(b) < 0.7
    cache = cache.commit(jnp.asarray(k), jnp.asarray(v), jnp.asarray(start, jnp.int32),
                         jnp.asarray(rows))
    _np_commit(ref_k, ref_v, ref_valid, k, v, start, rows, cap)
  np.testing.assert_array_equal(np.asarray(cache.k), ref_k)
  np.testing.assert_array_equal(np.asarray(cache.v), ref_v)
  np.testing.assert_array_equal(np.asarray(cache.valid), ref_valid)


def test_prefill_past_capacity_is_refused_with_the_sizes():
  # With a buffer, the K/V of positions 8, 9 used to land in the block buffer before an
  # unrelated broadcasting error on `valid`.
  cache = kv_cache.KVCache.empty(SPEC, 1, 8, 4, buffer_size=4)
  k, v = _kv(np.random.default_rng(2), 1, 10)
  with pytest.raises(ValueError, match="prefill of 10 positions exceeds the cache capacity 8"):
    cache.prefill(jnp.asarray(k), jnp.asarray(v), jnp.ones((1, 10), bool))


def test_write_buffer_refuses_a_write_of_the_wrong_width():
  # A 1-slot write used to be broadcast over every slot of the buffer.
  cache = kv_cache.KVCache.empty(SPEC, 2, 8, 4, buffer_size=4)
  k, v = _kv(np.random.default_rng(3), 2, 1)
  with pytest.raises(ValueError, match="buffer_size=4"):
    cache.write_buffer(jnp.asarray(k), jnp.asarray(v), jnp.zeros((2,), jnp.int32),
                       jnp.ones((2,), bool))


def _slot_meta(first_block, blocks, slots, real):
  """Slot metadata of ``blocks`` blocks from ``first_block[b]`` (block size 4)."""
  g = first_block[:, None] + np.repeat(np.arange(blocks), slots)[None]
  return masks.make_meta(4 * g + 3, 4, masks.CLEAN, np.where(real, 0, -1))


def test_summary_bank_write_past_the_last_block_drops_it():
  # A bank of 3 blocks x 2 slots. Row 0 writes blocks 2, 3 (3 does not exist), row 1
  # blocks 0, 1, row 2 does not write. A clamped write put block 2's slots on block 1.
  rng = np.random.default_rng(4)
  b, s, g = 3, 2, 3
  bank = summary_bank.SummaryBank.empty(SPEC, b, g, s)
  k0, v0 = _kv(rng, b, g * s)
  bank = bank.write(jnp.asarray(k0), jnp.asarray(v0),
                    _slot_meta(np.zeros(b, int), g, s, np.ones((b, g * s), bool)),
                    jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool))
  ref = {f: np.asarray(getattr(bank, f)).copy()
         for f in ("k", "v", "positions", "block_ids", "valid")}
  k, v = _kv(rng, b, 2 * s)
  first, rows = np.array([2, 0, 1]), np.array([True, True, False])
  real = np.array([[True] * 4, [False, False, True, True], [True] * 4])
  meta = _slot_meta(first, 2, s, real)
  got = bank.write(jnp.asarray(k), jnp.asarray(v), meta, jnp.asarray(first, jnp.int32),
                   jnp.asarray(rows))
  for r in range(b):
    for j in range(2 * s):
      p = first[r] * s + j
      if rows[r] and p < g * s:
        ref["k"][:, r, p], ref["v"][:, r, p] = k[:, r, j], v[:, r, j]
        ref["positions"][r, p] = np.asarray(meta.positions)[r, j]
        ref["block_ids"][r, p] = np.asarray(meta.block_ids)[r, j]
        ref["valid"][r, p] = real[r, j]
  for f, want in ref.items():
    np.testing.assert_array_equal(np.asarray(getattr(got, f)), want, err_msg=f)


def test_summary_bank_refuses_a_partial_block_of_slots():
  # 3 slots into a bank of 2 per block would misalign every later block's slots.
  bank = summary_bank.SummaryBank.empty(SPEC, 1, 4, 2)
  k, v = _kv(np.random.default_rng(5), 1, 3)
  meta = masks.make_meta(np.zeros((1, 3), np.int32), 4, masks.CLEAN)
  with pytest.raises(ValueError, match="num_slots=2"):
    bank.write(jnp.asarray(k), jnp.asarray(v), meta, jnp.zeros((1,), jnp.int32),
               jnp.ones((1,), bool))


@pytest.mark.parametrize("rng", [42, np.array([0, 42], np.int32)])
def test_a_seed_or_signed_key_data_as_rng_is_refused_naming_rng(rng):
  # JAX's own error ("invalid PRNG key data ... Got 42") names neither the argument nor
  # the fix.
  with pytest.raises(ValueError, match=r"rng must be a key \(jax.random.key\(seed\)\)"):
    keys.normalize(rng, 2)


def test_raw_and_typed_keys_draw_alike():
  # What normalize accepts: raw PRNGKey data is the typed key with the same bits.
  raw = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(
      np.asarray(jax.random.key_data(keys.normalize(raw, 3))), np.asarray(raw))
  per_row = keys.normalize(jnp.stack([raw, jax.random.PRNGKey(8)]), 2)
  assert per_row.shape == (2,)
  np.testing.assert_array_equal(np.asarray(keys.uniform(per_row, (2, 4)))[0],
                                np.asarray(jax.random.uniform(jax.random.key(7), (4,))))


def test_bucket_takes_numpy_widths():
  # A numpy width (e.g. `prompt_len.max()`) used to raise AttributeError (no bit_length).
  widths = sorted({16} | {(4 + j) << e for e in range(2, 12) for j in range(4)})
  for n in (0, 1, 16, 17, 33, 100, 1000, 4095):
    want = min(min(w for w in widths if w >= n), 4096)
    got = jit_cache.bucket(np.int64(n), np.int32(4096))
    assert got == want and type(got) is int, (n, got, want)
