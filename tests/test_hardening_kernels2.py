"""Edges of the Pallas kernels' public ops: empty axes, bad arguments, odd shapes.

Each case is checked against the op's plain reference (or must be refused with an
error naming the argument), and the odd shapes also against their CUDA lowering.
"""

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET, TRITON_CALL
from blockdiff_jax import masks
from pallas_kernels import block_attention as ba
from pallas_kernels import decode_attention as da
from pallas_kernels import gmm as gmm_lib

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

SMALL_ATTN = ba.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _normal(seed, *shapes, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


@pytest.mark.parametrize("batch,heads,kv_heads", [(0, 4, 2), (2, 0, 1)])
def test_decode_attention_empty_batch_or_heads_gives_empty_output(batch, heads, kv_heads):
  """An empty batch or head axis used to fail in the tiling with a TypeError."""
  q, k, v = _normal(0, (batch, 3, heads, 16), (batch, 20, kv_heads, 16),
                    (batch, 20, kv_heads, 16))
  out = da.decode_attention(q, k, v, interpret=INTERPRET)
  want = da.reference_attention(q, k, v)
  assert out.shape == want.shape == q.shape and out.dtype == want.dtype


def test_zero_kv_heads_is_refused_naming_kv_heads():
  """k with no head divided by zero in the validation (ZeroDivisionError)."""
  q, k = _normal(1, (1, 4, 2, 16), (1, 4, 0, 16))
  meta = masks.make_meta(jnp.arange(4)[None], 4, masks.CLEAN)
  with pytest.raises(ValueError, match="kv_heads must be >= 1"):
    ba.block_attention(q, k, k, meta, meta, interpret=INTERPRET)
  with pytest.raises(ValueError, match="kv_heads must be >= 1"):
    da.decode_attention(q, k, k, interpret=INTERPRET)


def test_fractional_indices_are_refused():
  """Float positions were truncated to int32 by the kernel: an empty slot at
  position -0.5 (the reference skips it) became a visible slot at 0. tgmm likewise
  truncated float group sizes where ``gmm`` refuses them."""
  q, k = _normal(2, (1, 1, 1, 16), (1, 2, 1, 16))
  with pytest.raises(ValueError, match="kv_positions must be integer"):
    da.decode_attention(q, k, k, q_positions=jnp.array([[3]]),
                        kv_positions=jnp.array([[0.0, -0.5]]), interpret=INTERPRET)
  with pytest.raises(ValueError, match="kv_lengths must be integer"):
    da.decode_attention(q, k, k, kv_lengths=jnp.array([1.5]), interpret=INTERPRET)
  lhs, dout = _normal(3, (8, 16), (8, 16))
  with pytest.raises(ValueError, match="tgmm: group_sizes must be integer"):
    gmm_lib.tgmm(lhs, dout, jnp.array([2.7, 0.6]), interpret=INTERPRET)


def test_block_attention_odd_head_dim_gqa_fp16_with_an_invisible_row():
  """head_dim 80, 3 query heads per kv head, a 3-token query block over a 1-slot
  cache plus itself, one query that sees nothing; fp16 in and out, fp32 inside."""
  cache = masks.make_meta(jnp.zeros((1, 1), jnp.int32), 4, masks.CLEAN)
  block = masks.make_meta(jnp.arange(4, 7)[None], 4, masks.NOISY,
                          segment_ids=jnp.array([[0, -1, 0]]))
  kv_meta = cache.concat(block)
  q, k, v, do = _normal(4, (1, 3, 3, 80), (1, 4, 1, 80), (1, 4, 1, 80), (1, 3, 3, 80),
                        dtype=jnp.float16)

  def vjp(fn, *args):
    out, back = jax.vjp(lambda q, k, v: fn(q, k, v, block, kv_meta), *args)
    return out, back(do.astype(out.dtype))

  got = jax.jit(lambda q, k, v: vjp(lambda *a: ba.block_attention(
      *a, block_sizes=SMALL_ATTN, interpret=INTERPRET), q, k, v))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  want = vjp(ba.masked_attention, f32(q), f32(k), f32(v))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=4e-3, rtol=4e-3)
  out, (dq, _, _) = got
  assert not np.any(np.asarray(out[0, 1])) and not np.any(np.asarray(dq[0, 1]))
  assert np.all(np.abs(np.asarray(out[0, ::2], np.float32)).sum(-1) > 0)


def test_edge_shapes_lower_for_cuda():
  """Head dims 80/96, one query, a 1-slot cache, GQA 3 and sub-tile gmm shapes."""
  sds = jax.ShapeDtypeStruct
  cuda = lambda fn, *a: export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*a).mlir_module()
  q_meta = masks.make_meta(jnp.ones((1, 1), jnp.int32), 4, masks.NOISY)
  kv_meta = masks.make_meta(jnp.zeros((1, 1), jnp.int32), 4, masks.CLEAN)

  def attention_grads(q, k, v):
    loss = lambda *a: jnp.sum(ba.block_attention(*a, q_meta, kv_meta).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = cuda(attention_grads, sds((1, 1, 3, 80), jnp.float16),
              sds((1, 1, 1, 80), jnp.float16), sds((1, 1, 1, 80), jnp.float16))
  assert text.count(TRITON_CALL) == 3
  text = cuda(lambda q, k, v: da.decode_attention(q, k, v), sds((1, 1, 6, 96), jnp.bfloat16),
              sds((1, 1, 2, 96), jnp.bfloat16), sds((1, 1, 2, 96), jnp.bfloat16))
  assert text.count(TRITON_CALL) == 1

  def gmm_vjp(lhs, rhs, gs):
    out, back = jax.vjp(lambda a, b: gmm_lib.gmm(a, b, gs), lhs, rhs)
    return back(out)

  text = cuda(gmm_vjp, sds((5, 8), jnp.float32), sds((2, 8, 3), jnp.float32),
              sds((2,), jnp.int32))
  assert text.count(TRITON_CALL) == 3
