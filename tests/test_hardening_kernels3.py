"""Attention ops at shapes the kernel tests skip, and their input validation.

Ragged lengths, one query row, GQA, head_dim 80/64, bf16, packed documents across
tile edges, rows that see nothing, and split-K decoding with cache lengths 0, 1 and
one that no split divides: each against the plain-jnp reference, forward and
backward. Then bad inputs: each public op refuses them with an error naming the
argument instead of a silently wrong result or an error from deep inside.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET
from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops
from blockdiff_jax.model import summary_attention
from pallas_kernels import block_attention as ba
from pallas_kernels import decode_attention as da

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

TILES = ba.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _normal(seed, *shapes, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _grads(fn, q, k, v, do):
  out, back = jax.vjp(fn, q, k, v)
  return (out,) + back(do.astype(out.dtype))


@pytest.mark.parametrize("tq,tk,heads,kv_heads,dim,dtype", [
    (19, 19, 4, 1, 80, jnp.bfloat16),  # ragged, GQA 4, head_dim 80, bf16
    (1, 37, 2, 2, 64, jnp.float32),  # one query row against a ragged cache, no GQA
])
def test_block_attention_ragged_packed_fwd_bwd_match_reference(tq, tk, heads, kv_heads, dim,
                                                               dtype):
  """Documents 0/1 meet at token 7, inside the first 16-tile, and document 1 runs
  across the tile edge at 16; the last keys are padding and one query belongs to a
  document with no key (its output and gradient must be exactly zero)."""
  seg = np.array([0] * 7 + [1] * (tk - 10) + [-1] * 3)
  kv_meta = masks.make_meta(jnp.arange(tk)[None], 4, masks.CLEAN, seg[None])
  q_seg = seg[tk - tq:].copy()
  q_seg[0] = 5  # sees nothing
  q_meta = masks.make_meta(jnp.arange(tk - tq, tk)[None], 4, masks.CLEAN, q_seg[None])
  q, do = _normal(0, (1, tq, heads, dim), (1, tq, heads, dim), dtype=dtype)
  k, v = _normal(1, (1, tk, kv_heads, dim), (1, tk, kv_heads, dim), dtype=dtype)
  got = jax.jit(lambda *a: _grads(lambda q, k, v: ba.block_attention(
      q, k, v, q_meta, kv_meta, block_sizes=TILES, interpret=INTERPRET), *a))(q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  want = _grads(lambda q, k, v: ba.masked_attention(q, k, v, q_meta, kv_meta),
                f32(q), f32(k), f32(v), f32(do))
  tol = 3e-2 if dtype == jnp.bfloat16 else 1e-5
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == dtype, name
    np.testing.assert_allclose(np.asarray(f32(g)), np.asarray(w), atol=tol, rtol=tol,
                               err_msg=name)
  out, dq = np.asarray(f32(got[0])), np.asarray(f32(got[1]))
  assert np.all(out[0, 0] == 0) and np.all(dq[0, 0] == 0)
  assert np.all(np.isfinite(out))
  seen = q_seg >= 0
  seen[0] = False
  assert np.all(np.abs(out[0, seen]).sum(-1) > 0) and np.all(out[0, ~seen] == 0)


def test_decode_attention_cache_lengths_zero_one_and_unaligned():
  """Lengths 0, 1 and 37 of 50 slots, 3 splits asked for (50 is no multiple of the
  16-slot tile nor of any split), GQA 2, head_dim 80, block-causal positions."""
  b, s, tq = 3, 50, 2
  q = _normal(2, (b, tq, 4, 80))[0]
  k, v = _normal(3, (b, s, 2, 80), (b, s, 2, 80))
  lengths = jnp.array([0, 1, 37], jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  q_pos = lengths[:, None] + jnp.arange(tq, dtype=jnp.int32)[None]
  kw = dict(q_positions=q_pos, kv_positions=kv_pos, kv_lengths=lengths, block_size=2)
  tiles = da.DecodeBlockSizes(block_m=16, block_k=16, num_splits=3)
  assert da.split_plan(q.shape, k.shape, tiles).num_splits > 1
  got = np.asarray(da.decode_attention(q, k, v, block_sizes=tiles, interpret=INTERPRET, **kw))
  want = np.asarray(da.reference_attention(q, k, v, **kw))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.all(got[0] == 0)  # an empty cache: zeros, not NaN
  # Length 1: the one slot's value, whatever the logits.
  np.testing.assert_allclose(got[1, :, :2], np.broadcast_to(v[1, 0, :1], (tq, 2, 80)),
                             rtol=1e-6)


def test_block_attention_refuses_fractional_metadata():
  """The kernel packed metadata as int32: a key at segment -0.5 (padding to the
  reference, which outputs 0 here) became segment 0 and was seen (output 0.9997)."""
  q = jnp.ones((1, 1, 1, 16))
  k = jnp.stack([jnp.ones(16), 3 * jnp.ones(16)])[None, :, None]
  q_meta = masks.make_meta(jnp.array([[1]]), 4, masks.CLEAN)
  kv_meta = masks.TokenMeta(positions=jnp.array([[0, 1]]), block_ids=jnp.array([[0, 0]]),
                            stream=jnp.array([[1, 1]]), segment_ids=jnp.array([[0.0, -0.5]]),
                            is_summary=jnp.zeros((1, 2), bool))
  with pytest.raises(ValueError, match="kv_meta.segment_ids must be integer or bool"):
    ba.block_attention(q, k, k, q_meta, kv_meta, interpret=INTERPRET)


def _layout_meta(length, block, slots):
  clean = masks.make_meta(jnp.arange(length)[None], block, masks.CLEAN)
  return clean.concat(masks.summary_slots_meta(clean, block, slots))


@pytest.mark.parametrize("op", ["masked_attention", "structured_attention"])
def test_xla_attention_ops_name_bad_shapes(op):
  """No kv head divided by zero (ZeroDivisionError); a short metadata row failed in
  a reshape or a broadcast without naming the argument."""
  meta = _layout_meta(8, 4, 1)  # [1, 10]
  if op == "masked_attention":
    fn = lambda q, k, v, m: attention_ops.masked_attention(q, k, v, m, m)
  else:
    layout, spec = masks.SummaryLayout(1, 4, 1), masks.MaskSpec(window_blocks=1)
    fn = lambda q, k, v, m: summary_attention.structured_attention(q, k, v, m, layout, spec)
  q, k = _normal(4, (1, 10, 2, 8), (1, 10, 1, 8))
  with pytest.raises(ValueError, match="heads=2 is not a multiple of kv_heads=0"):
    fn(q, k[:, :, :0], k[:, :, :0], meta)
  with pytest.raises(ValueError, match=r"meta field shapes \[\(1, 9\)"):
    fn(q, k, k, meta.slice(0, 9))
  with pytest.raises(ValueError, match="k and v shapes differ"):
    fn(q, k, k[:, :9], meta)
  with pytest.raises(ValueError, match="does not match q .* in batch or head_dim"):
    fn(q, k[..., :4], k[..., :4], meta)


def test_decode_attention_accepts_nested_lists_like_its_reference():
  """Lists for positions/lengths failed in the validation (``list.shape``)."""
  q = jnp.ones((1, 1, 1, 16))
  k = jnp.ones((1, 2, 1, 16))
  v = jnp.arange(32.0).reshape(1, 2, 1, 16)
  kw = dict(q_positions=[[0]], kv_positions=[[0, 1]], kv_lengths=[2])
  got = da.decode_attention(q, k, v, interpret=INTERPRET, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(da.reference_attention(
      q, k, v, **{n: jnp.asarray(x) for n, x in kw.items()})))
  assert float(got[0, 0, 0, 0]) == 0.0  # only slot 0 (position 0) is visible
  with pytest.raises(ValueError, match="q_positions shape"):
    da.decode_attention(q, k, v, q_positions=[[0, 1]], kv_positions=[[0, 1]],
                        interpret=INTERPRET)
