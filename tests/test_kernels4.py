"""Attention metadata that broadcasts to [batch, T], attention without keys, and a
traced logit scale: the Pallas block attention, its reference and the model's XLA
path must agree on what they accept and compute.

Each case is checked against an independent computation with explicit [batch, T]
metadata (or must be refused with an error naming the argument).
"""

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET, TRITON_CALL
from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops
from pallas_kernels import block_attention as ba
from pallas_kernels import decode_attention as da

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

TILES = ba.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _normal(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _meta(positions, segment_ids):
  """Block-causal clean metadata (block 4) with one padding key per row."""
  return masks.make_meta(positions, 4, masks.CLEAN, segment_ids)


def _vjp(fn, q, k, v, do):
  out, back = jax.vjp(fn, q, k, v)
  return (out,) + back(do)


@pytest.mark.parametrize("rank", [1, 2])
def test_block_attention_metadata_broadcasts_over_the_batch(rank):
  """One metadata row ([1, T], or [T]) for a batch of 2 was refused ("shape (1, 10) !=
  (2, 10)") where the reference and the XLA path broadcast it."""
  t, batch = 10, 2
  seg = jnp.asarray([0] * 9 + [-1], jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)
  row = _meta(pos, seg) if rank == 1 else _meta(pos[None], seg[None])
  full = _meta(jnp.broadcast_to(pos, (batch, t)), jnp.broadcast_to(seg, (batch, t)))
  q, k, v, do = _normal(0, (batch, t, 2, 16), (batch, t, 1, 16), (batch, t, 1, 16),
                        (batch, t, 2, 16))
  got = jax.jit(lambda *a: _vjp(lambda q, k, v: ba.block_attention(
      q, k, v, row, row, block_sizes=TILES, interpret=INTERPRET), *a))(q, k, v, do)
  want = _vjp(lambda q, k, v: ba.masked_attention(q, k, v, full, full), q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
  # The two batch rows see the same mask but different inputs.
  assert not np.allclose(got[0][0], got[0][1])
  bad = _meta(jnp.zeros((3, t), jnp.int32), jnp.zeros((3, t), jnp.int32))
  with pytest.raises(ValueError, match=r"q_meta shape \(3, 10\) does not broadcast"):
    ba.block_attention(q, k, v, bad, full, interpret=INTERPRET)


@pytest.mark.parametrize("t", [3, 4])
def test_xla_attention_metadata_of_shape_t(t):
  """Fields of shape [T] pass validate_qkv, but the mask put their query axis on the
  batch axis: a broadcasting error (T=3), or with T equal to kv_heads (4) a silently
  wrong mask. The result must equal that of explicit [1, T] metadata."""
  pos = jnp.arange(t, dtype=jnp.int32)
  seg = jnp.asarray([0] * (t - 1) + [-1], jnp.int32)
  flat, row = _meta(pos, seg), _meta(pos[None], seg[None])
  q, k, v = _normal(1, (1, t, 4, 8), (1, t, 4, 8), (1, t, 4, 8))
  got = attention_ops.masked_attention(q, k, v, flat, flat)
  np.testing.assert_allclose(got, ba.masked_attention(q, k, v, row, row), atol=1e-6)
  np.testing.assert_allclose(ba.masked_attention(q, k, v, flat, flat), got, atol=1e-6)


def test_xla_attention_without_keys_outputs_zeros():
  """No key at all (Tk = 0): the max over an empty axis raised; every query sees
  nothing, so outputs and gradients are zeros, as with the kernel and its reference."""
  q_meta = _meta(jnp.arange(3)[None], jnp.zeros((1, 3), jnp.int32))
  kv_meta = _meta(jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0), jnp.int32))
  q, k = _normal(2, (1, 3, 2, 8), (1, 0, 1, 8))
  loss = lambda q, k, v: jnp.sum(attention_ops.masked_attention(q, k, v, q_meta, kv_meta))
  out = attention_ops.masked_attention(q, k, k, q_meta, kv_meta)
  dq, dk, _ = jax.grad(loss, argnums=(0, 1, 2))(q, k, k)
  assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape
  np.testing.assert_array_equal(out, np.zeros(q.shape))
  np.testing.assert_array_equal(dq, np.zeros(q.shape))
  np.testing.assert_array_equal(out, ba.masked_attention(q, k, k, q_meta, kv_meta))


def test_traced_scale_is_refused_by_name():
  """A jitted scale failed inside ``float`` (ConcretizationTypeError) without naming
  the argument; the kernels compile the scale in, so it must be static."""
  meta = _meta(jnp.arange(5)[None], jnp.zeros((1, 5), jnp.int32))
  q, k = _normal(3, (1, 5, 2, 16), (1, 5, 1, 16))
  calls = {
      "block_attention": lambda s: ba.block_attention(q, k, k, meta, meta, scale=s,
                                                      interpret=INTERPRET),
      "decode_attention": lambda s: da.decode_attention(q, k, k, scale=s, interpret=INTERPRET),
  }
  for op, fn in calls.items():
    with pytest.raises(ValueError, match=f"{op}: scale must be a static number"):
      jax.jit(fn)(0.5)
  # A concrete array scale is still a number.
  np.testing.assert_allclose(
      da.decode_attention(q, k, k, scale=jnp.float32(0.5), interpret=INTERPRET),
      da.reference_attention(q, k, k, scale=0.5), atol=1e-5)


def test_broadcast_metadata_lowers_for_cuda():
  """The fwd + dq + dk/dv kernels of a batch of 3 with one metadata row, exported for
  CUDA at an odd length (13) and head_dim 64 with GQA 4 (was refused)."""
  t = 13
  meta = _meta(jnp.arange(t)[None], jnp.zeros((1, t), jnp.int32))

  def grads(q, k, v):
    loss = lambda *a: jnp.sum(ba.block_attention(*a, meta, meta).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  sds = lambda h: jax.ShapeDtypeStruct((3, t, h, 64), jnp.bfloat16)
  text = export.export(
      jax.jit(grads), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
          sds(4), sds(1), sds(1)).mlir_module()
  assert text.count(TRITON_CALL) == 3
