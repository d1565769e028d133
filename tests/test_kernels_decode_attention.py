"""Split-K decode attention: interpret mode against the reference, and its cuda lowering."""

import os
import subprocess
import sys

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET, ROOT, TRITON_CALL
from pallas_kernels import decode_attention as da
from pallas_kernels.decode_attention import kernel

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def _inputs(batch, tq, heads, kv_heads, head_dim, cache, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, tq, heads, head_dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, cache, kv_heads, head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, cache, kv_heads, head_dim)), dtype)
  return q, k, v


def _decode_meta(batch, tq, cache, block_size, lengths, holes=0, seed=0):
  """Each row: a cache of committed slots followed by the query block's own slots.

  Row b uses ``lengths[b]`` slots: positions 0.. for committed tokens, then the
  ``tq`` query tokens at the next block boundary. ``holes`` committed slots per
  row are marked empty (position -1), as a compressed cache leaves them.
  """
  rng = np.random.default_rng(seed)
  kv_pos = np.full((batch, cache), -1, np.int32)
  q_pos = np.zeros((batch, tq), np.int32)
  for b, n in enumerate(lengths):
    committed = n - tq
    start = -(-committed // block_size) * block_size
    kv_pos[b, :committed] = np.arange(committed)
    kv_pos[b, committed:n] = start + np.arange(tq)
    q_pos[b] = start + np.arange(tq)
    if holes:
      kv_pos[b, rng.choice(committed, holes, replace=False)] = -1
  return jnp.asarray(q_pos), jnp.asarray(kv_pos), jnp.asarray(lengths, jnp.int32)


CASES = {
    # name: (batch, tq, heads, kv_heads, head_dim, cache, block_size, lengths, holes)
    "gqa_block32": (1, 32, 8, 2, 32, 300, 32, [300], 0),
    "mha_causal_ragged_rows": (2, 8, 2, 2, 16, 157, 1, [157, 40], 0),
    "mqa_block8_holes": (2, 8, 4, 1, 64, 210, 8, [200, 90], 7),
    "gqa_odd_head_dim": (1, 4, 6, 3, 24, 97, 4, [97], 3),
    "single_token": (3, 1, 4, 2, 16, 64, 1, [64, 20, 1], 0),
}


def _run(name, dtype, block_sizes, scale=None):
  batch, tq, h, hkv, d, cache, bsz, lengths, holes = CASES[name]
  q, k, v = _inputs(batch, tq, h, hkv, d, cache, dtype)
  q_pos, kv_pos, lens = _decode_meta(batch, tq, cache, bsz, lengths, holes)
  kw = dict(q_positions=q_pos, kv_positions=kv_pos, kv_lengths=lens, block_size=bsz,
            scale=scale)
  out = jax.jit(lambda q, k, v: da.decode_attention(
      q, k, v, block_sizes=block_sizes, interpret=INTERPRET, **kw))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  ref = da.reference_attention(f32(q), f32(k), f32(v), **kw)
  assert out.shape == q.shape and out.dtype == dtype
  tol = dict(atol=2e-5, rtol=1e-4) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), **tol)
  return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference_fp32(name, splits):
  _run(name, jnp.float32, da.DecodeBlockSizes(block_k=16, num_splits=splits))


@pytest.mark.parametrize("name", ["gqa_block32", "mqa_block8_holes"])
def test_matches_reference_bf16(name):
  _run(name, jnp.bfloat16, da.DecodeBlockSizes(block_k=32, num_splits=4))


@pytest.mark.parametrize("block_sizes", [
    da.DecodeBlockSizes(block_m=16, block_k=16, num_splits=5),  # Row tiles: 2 per kv head.
    da.DecodeBlockSizes(block_k=64),  # Default split count, one tile per split.
    da.DecodeBlockSizes(block_k=16, num_splits=100),  # More splits than tiles: clamped.
])
def test_tilings_agree(block_sizes):
  _run("gqa_block32", jnp.float32, block_sizes)


def test_length_only_mask_and_scale():
  q, k, v = _inputs(2, 4, 4, 2, 16, 50, jnp.float32)
  lens = jnp.array([50, 13], jnp.int32)
  # interpret=None: the op picks the interpreter off GPUs.
  out = jax.jit(lambda q, k, v: da.decode_attention(
      q, k, v, kv_lengths=lens, scale=0.3,
      block_sizes=da.DecodeBlockSizes(block_k=16, num_splits=2)))(q, k, v)
  # Independent check: softmax over the first lens[b] slots, in numpy float64.
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  for b, n in enumerate([50, 13]):
    for hh in range(4):
      logits = 0.3 * qn[b, :, hh] @ kn[b, :n, hh // 2].T
      p = np.exp(logits - logits.max(-1, keepdims=True))
      want = (p / p.sum(-1, keepdims=True)) @ vn[b, :n, hh // 2]
      np.testing.assert_allclose(np.asarray(out[b, :, hh]), want, atol=2e-5, rtol=1e-4)


def test_invisible_queries_output_zeros():
  # Row 1's cache is empty (length 0); row 0's first query precedes every slot.
  q, k, v = _inputs(2, 4, 2, 1, 16, 40, jnp.float32)
  q_pos = jnp.array([[-5, 10, 20, 30], [0, 1, 2, 3]], jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
  lens = jnp.array([40, 0], jnp.int32)
  kw = dict(q_positions=q_pos, kv_positions=kv_pos, kv_lengths=lens)
  out = da.decode_attention(q, k, v, interpret=INTERPRET,
                            block_sizes=da.DecodeBlockSizes(block_k=16, num_splits=3), **kw)
  assert not np.any(np.asarray(out[1])) and not np.any(np.asarray(out[0, 0]))
  assert np.all(np.abs(np.asarray(out[0, 1:])).sum(-1) > 0)
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(da.reference_attention(q, k, v, **kw)), atol=2e-5)


def test_split_layout_covers_the_cache_without_empty_splits():
  for length in (1, 15, 16, 17, 300, 4097, 131072):
    for splits in (None, 1, 3, 64):
      bs = da.DecodeBlockSizes(block_k=64, num_splits=splits)
      lay = kernel.split_layout(length, programs_per_split=8, bs=bs)
      assert lay.chunk % lay.block_k == 0 and lay.padded_length >= length
      assert (lay.num_splits - 1) * lay.chunk < length  # The last split has work.
      if splits is not None:
        assert lay.num_splits <= splits
  # Default: enough splits for ~target_programs programs on a long cache.
  lay = kernel.split_layout(131072, programs_per_split=8, bs=da.DecodeBlockSizes())
  assert lay.num_splits == 33


def test_combine_is_exact_for_any_partition():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 40)) * 4
  vals = rng.normal(size=(40, 8))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = (p / p.sum(-1, keepdims=True)) @ vals
  parts = []
  for sl in (slice(0, 7), slice(7, 8), slice(8, 40), slice(40, 40)):  # Incl. an empty split.
    lg = logits[:, sl] * kernel.LOG2_E
    m = lg.max(-1) if lg.shape[1] else np.full(5, kernel.MASK_VALUE)
    e = np.exp2(lg - m[:, None])
    parts.append((e @ vals[sl], m, e.sum(-1)))
  o, m, l = (jnp.asarray(np.stack(x), jnp.float32) for x in zip(*parts))
  np.testing.assert_allclose(np.asarray(kernel.combine(o, m, l)), want, atol=1e-5)


def test_validation_names_the_bad_input():
  q, k, v = _inputs(1, 4, 3, 2, 16, 20, jnp.float32)
  with pytest.raises(ValueError, match="kv_heads=2"):
    da.decode_attention(q, k, v)
  q, k, v = _inputs(1, 4, 4, 2, 16, 20, jnp.float32)
  with pytest.raises(ValueError, match="kv_lengths shape"):
    da.decode_attention(q, k, v, kv_lengths=jnp.array([1, 2]))
  with pytest.raises(ValueError, match="both q_positions and kv_positions"):
    da.decode_attention(q, k, v, q_positions=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="dtypes differ"):
    da.decode_attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="block_k"):
    da.DecodeBlockSizes(block_k=48)
  with pytest.raises(ValueError, match="num_splits"):
    da.DecodeBlockSizes(num_splits=0)


def test_kernel_package_does_not_import_blockdiff_jax():
  code = ("import sys; import pallas_kernels.decode_attention; "
          "bad = [m for m in sys.modules if m.startswith('blockdiff_jax')]; "
          "assert not bad, bad")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("dtype,block_size", [(jnp.bfloat16, 32), (jnp.float32, 1)])
def test_decode_attention_lowers_for_cuda(dtype, block_size):
  """Exports the split kernel for CUDA from this CPU-only machine.

  Pallas generates the Triton IR in Python, so lowering errors fail here; only the
  PTX compilation needs a GPU (as in test_kernels_block_attention).
  """
  b, tq, h, hkv, d, s = 2, 32, 32, 8, 128, 32768

  def fn(q, k, v, q_pos, kv_pos, lens):
    return da.decode_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                               kv_lengths=lens, block_size=block_size, interpret=False)

  sds = jax.ShapeDtypeStruct
  exported = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
          sds((b, tq, h, d), dtype), sds((b, s, hkv, d), dtype), sds((b, s, hkv, d), dtype),
          sds((b, tq), jnp.int32), sds((b, s), jnp.int32), sds((b,), jnp.int32))
  text = exported.mlir_module()
  assert text.count(TRITON_CALL) == 1
  assert 'name = "decode_attention_split"' in text
