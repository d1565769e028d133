"""Tests of the block-attention Pallas kernels (interpret mode) and their cuda lowering."""

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET, TRITON_CALL
from blockdiff_jax import masks
from pallas_kernels import block_attention as ba

SMALL = ba.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def _training(length, block_size, batch=1, segments=None):
  meta = masks.training_meta(length, block_size, batch, segment_ids=segments)
  return meta, meta


def _decoding(cache_len, block_size, empty_slots=0):
  """Queries: one noisy block; keys: a clean cache (some empty slots) + that block."""
  pos_cache = jnp.arange(cache_len, dtype=jnp.int32)[None]
  seg_cache = jnp.where(pos_cache < cache_len - empty_slots, 0, -1)
  cache = masks.make_meta(pos_cache, block_size, masks.CLEAN, segment_ids=seg_cache)
  # The current block starts at the next block boundary after the cache's content.
  start = -(-(cache_len - empty_slots) // block_size) * block_size
  pos_block = start + jnp.arange(block_size, dtype=jnp.int32)[None]
  block = masks.make_meta(pos_block, block_size, masks.NOISY)
  return block, cache.concat(block)


def _summary(length, block_size, slots):
  """ChatDLM layout: [x_t ; x_0 ; summary slots of every block]."""
  noisy, clean = (masks.make_meta(jnp.arange(length)[None], block_size, s)
                  for s in (masks.NOISY, masks.CLEAN))
  num_blocks = length // block_size
  pos = jnp.repeat(jnp.arange(num_blocks) * block_size + block_size - 1, slots)[None]
  summary = masks.make_meta(pos, block_size, masks.CLEAN,
                            is_summary=jnp.ones(pos.shape, bool))
  meta = noisy.concat(clean).concat(summary)
  return meta, meta


def _padded_segments(length, block_size):
  """Two packed documents plus trailing padding (segment -1) in a batch of 2."""
  seg = np.zeros((2, length), np.int32)
  seg[0, length // 3:] = 1
  seg[1, length - 5:] = -1
  return _training(length, block_size, 2, jnp.asarray(seg))


CASES = {
    # name: (q_meta, kv_meta, spec, heads, kv_heads, head_dim)
    "train_bs4_gqa": (*_training(24, 4), masks.MaskSpec(), 4, 2, 16),
    "train_bs8_mha": (*_training(40, 8), masks.MaskSpec(), 2, 2, 16),
    "train_bs16_causal_noisy": (*_training(32, 16), masks.MaskSpec(causal_noisy=True), 2, 1, 32),
    "train_bs8_causal_blocks": (*_training(32, 8), masks.MaskSpec(causal_noisy=True,
                                                                  causal_clean=True), 2, 1, 16),
    "decode_cache": (*_decoding(37, 8, empty_slots=5), masks.MaskSpec(), 4, 1, 16),
    "summary_window": (*_summary(32, 4, 2), masks.MaskSpec(window_blocks=2), 2, 1, 16),
    "padded_segments": (*_padded_segments(21, 4), masks.MaskSpec(), 2, 1, 24),
}


def _qkv(batch, tq, tk, heads, kv_heads, head_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, tq, heads, head_dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, tk, kv_heads, head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, tk, kv_heads, head_dim)), dtype)
  do = jnp.asarray(rng.normal(size=(batch, tq, heads, head_dim)), dtype)
  return q, k, v, do


def _jit_vjp(fn):
  """Forward and VJP in one jitted call: eager interpret mode re-evaluates slowly."""
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)
  return jax.jit(run)


def _check(name, dtype, block_sizes=SMALL):
  q_meta, kv_meta, spec, heads, kv_heads, head_dim = CASES[name]
  (batch, tq), tk = q_meta.shape, kv_meta.shape[1]
  q, k, v, do = _qkv(batch, tq, tk, heads, kv_heads, head_dim, dtype)

  def op(q, k, v):
    return ba.block_attention(q, k, v, q_meta, kv_meta, spec=spec,
                              block_sizes=block_sizes, interpret=INTERPRET)

  def ref(q, k, v):
    # The reference runs in fp32 from the same (possibly bf16-rounded) inputs.
    f32 = lambda x: x.astype(jnp.float32)
    return ba.masked_attention(f32(q), f32(k), f32(v), q_meta, kv_meta, spec)

  out, grads = _jit_vjp(op)(q, k, v, do)
  ref_out, ref_grads = _jit_vjp(ref)(q, k, v, do.astype(jnp.float32))
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  if dtype == jnp.float32:
    tol = dict(atol=2e-5, rtol=1e-4)
  else:
    tol = dict(atol=4e-2, rtol=4e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), **tol)
  for got, want, label in zip(grads, ref_grads, "qkv"):
    scale = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale,
                               np.asarray(want) / scale, err_msg=f"d{label}", **tol)
  return q_meta, kv_meta, spec, out, grads


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
  _check(name, jnp.float32)


@pytest.mark.parametrize("name", ["train_bs8_mha", "decode_cache"])
def test_matches_reference_bf16(name):
  _check(name, jnp.bfloat16)


def test_mixed_tiles_and_invisible_rows_are_zero():
  # Different fwd/bwd tiles; padded rows (segment -1) see nothing: zero output/grad.
  sizes = ba.AttentionBlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
  q_meta, _, _, out, grads = _check("padded_segments", jnp.float32, sizes)
  invisible = np.asarray(q_meta.segment_ids[1] < 0)
  assert invisible.any()
  assert not np.any(np.asarray(out[1, invisible]))
  assert not np.any(np.asarray(grads[0][1, invisible]))


def test_tq_not_equal_tk_validation_and_scale():
  q_meta, kv_meta, spec, heads, kv_heads, d = CASES["decode_cache"]
  q, k, v, _ = _qkv(1, q_meta.shape[1], kv_meta.shape[1], heads, kv_heads, d, jnp.float32)
  out = jax.jit(lambda q, k, v: ba.block_attention(
      q, k, v, q_meta, kv_meta, scale=0.3, block_sizes=SMALL, interpret=INTERPRET))(q, k, v)
  ref = ba.masked_attention(q, k, v, q_meta, kv_meta, scale=0.3)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="kv_heads=3"):
    ba.block_attention(q, jnp.ones(k.shape[:2] + (3, d)), jnp.ones(k.shape[:2] + (3, d)),
                       q_meta, kv_meta, interpret=INTERPRET)
  with pytest.raises(ValueError, match="kv_meta shape"):
    ba.block_attention(q, k, v, q_meta, q_meta, interpret=INTERPRET)
  with pytest.raises(ValueError, match="block_k"):
    ba.AttentionBlockSizes(block_k=48)


@pytest.mark.parametrize("spec", [masks.MaskSpec(), masks.MaskSpec(True, 2)])
def test_block_attention_lowers_for_cuda(spec):
  """Exports fwd + dq + dk/dv kernels for CUDA from this CPU-only machine.

  The Triton IR is generated by Pallas in Python, so any lowering error of the
  kernels (mask_fn inside the kernel included) fails here; only the PTX
  compilation needs a GPU. The Triton custom call has no stability guarantee,
  hence the disabled export check.
  """
  batch, length, heads, kv_heads, d = 1, 512, 8, 2, 128
  meta = masks.training_meta(length, 32, batch)
  t = 2 * length

  def fwd_bwd(q, k, v):
    def loss(q, k, v):
      return jnp.sum(ba.block_attention(q, k, v, meta, meta, spec=spec).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  sds = lambda h: jax.ShapeDtypeStruct((batch, t, h, d), jnp.bfloat16)
  exported = export.export(
      jax.jit(fwd_bwd), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
          sds(heads), sds(kv_heads), sds(kv_heads))
  text = exported.mlir_module()
  assert text.count(TRITON_CALL) == 3
  for name in ("block_attention_fwd", "block_attention_dq", "block_attention_dkdv"):
    assert f'name = "{name}"' in text


def test_tile_map_matches_dense_mask_and_skips_tiles():
  from pallas_kernels.block_attention import kernel  # pylint: disable=g-import-not-at-top
  q_meta, kv_meta = _training(64, 8)
  spec = masks.MaskSpec(causal_noisy=True)
  packed = kernel.pack_meta(q_meta, 128)
  states = np.asarray(kernel.tile_map(packed, packed, spec, 32, 16))[0]
  dense = np.asarray(masks.dense_mask(q_meta, kv_meta, spec))[0]
  tiles = dense.reshape(4, 32, 8, 16).transpose(0, 2, 1, 3).reshape(4, 8, -1)
  want = np.where(~tiles.any(-1), kernel.EMPTY,
                  np.where(tiles.all(-1), kernel.FULL, kernel.PARTIAL))
  np.testing.assert_array_equal(states, want)
  # The training layout leaves most tiles empty: those are never loaded.
  assert (states == kernel.EMPTY).sum() >= states.size // 3
  assert (states == kernel.FULL).any() and (states == kernel.PARTIAL).any()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_the_model_xla_path(case, dtype):
  """The kernels' plain reference and the model's grouped XLA path are written apart."""
  from blockdiff_jax.model import attention_ops  # pylint: disable=g-import-not-at-top
  q_meta, kv_meta, spec, h, hkv, d = CASES[case]
  b, tq, tk = q_meta.shape[0], q_meta.shape[1], kv_meta.shape[1]
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (b, tq, h, d), dtype)
  k = jax.random.normal(kk, (b, tk, hkv, d), dtype)
  v = jax.random.normal(kv, (b, tk, hkv, d), dtype)
  want = attention_ops.masked_attention(q, k, v, q_meta, kv_meta, spec)
  got = ba.masked_attention(q, k, v, q_meta, kv_meta, spec)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)
