"""Edge cases of the Pallas kernels' public ops, each against its plain reference.

Found by an audit of ``pallas_kernels``: how ``interpret=None`` is resolved, kernels
inside ``shard_map``, zero-size operands, and metadata whose fields broadcast.
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

P = jax.sharding.PartitionSpec
TOL = dict(atol=2e-5, rtol=1e-4)
SMALL_ATTN = ba.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
SMALL_GMM = gmm_lib.GmmBlockSizes(block_m=16, block_k=16, block_n=16, num_warps=4,
                                  num_stages=2)


def _normal(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _assert_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


def _cuda_export(fn, *sds):
  return export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*sds)


# ------------------------------------------------ interpret=None, per platform


def test_decode_attention_default_interpret_is_chosen_per_platform():
  """interpret=None gives the Triton kernel in a program lowered for CUDA.

  It used to follow ``jax.default_backend()`` at trace time, so a decode program
  exported (or AOT-compiled) for a GPU from a CPU host held the interpreter,
  unlike block_attention and gmm.
  """
  sds = jax.ShapeDtypeStruct
  text = _cuda_export(
      lambda q, k, v: da.decode_attention(q, k, v),
      sds((1, 4, 4, 64), jnp.bfloat16), sds((1, 256, 2, 64), jnp.bfloat16),
      sds((1, 256, 2, 64), jnp.bfloat16)).mlir_module()
  assert text.count(TRITON_CALL) == 1
  assert 'name = "decode_attention_split"' in text
  # The same call still runs (interpreted) here.
  q, k, v = _normal(0, (1, 3, 4, 16), (1, 37, 2, 16), (1, 37, 2, 16))
  lens = jnp.array([29], jnp.int32)
  out = jax.jit(lambda q, k, v: da.decode_attention(
      q, k, v, kv_lengths=lens, block_sizes=da.DecodeBlockSizes(block_k=16,
                                                                 num_splits=2)))(q, k, v)
  _assert_close(out, da.reference_attention(q, k, v, kv_lengths=lens))


# ------------------------------------------------------------- inside shard_map


def _sharded(op):
  """``op`` in a shard_map over the heads (varying-axes checks on, the default)."""
  mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = P(None, None, "x")
  return jax.jit(jax.shard_map(op, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))


@pytest.mark.parametrize("kernel", ["decode_attention", "block_attention"])
def test_attention_kernels_trace_and_lower_inside_shard_map(kernel):
  """Every pallas_call output must carry the operands' varying mesh axes.

  decode_attention declared plain ShapeDtypeStructs, so tracing it inside a
  shard_map failed even for the compiled GPU kernel. (The CPU interpreter itself
  cannot run there in JAX 0.10, so this lowers for CUDA instead of running.)
  """
  meta = masks.training_meta(8, 4)
  if kernel == "decode_attention":
    op = lambda q, k, v: da.decode_attention(q, k, v, interpret=False)
  else:
    op = lambda q, k, v: ba.block_attention(q, k, v, meta, meta, interpret=False)
  sds = jax.ShapeDtypeStruct
  args = (sds((1, 16, 4, 16), jnp.float32), sds((1, 16, 2, 16), jnp.float32),
          sds((1, 16, 2, 16), jnp.float32))
  lowered = _sharded(op).trace(*args).lower(lowering_platforms=("cuda",))
  assert TRITON_CALL in lowered.as_text()


# ------------------------------------------------------------ zero-size operands


@pytest.mark.parametrize("m,k,n,group_sizes", [
    (0, 16, 8, [0, 0]),      # no routed row at all
    (5, 0, 8, [2, 3]),       # empty contraction: zeros
    (5, 16, 0, [4, 0, 1]),   # no output column
])
def test_gmm_zero_size_operands_match_ragged_dot(m, k, n, group_sizes):
  """These divided by zero while tiling; ragged_dot answers them."""
  lhs, rhs, dout = _normal(1, (m, k), (len(group_sizes), k, n), (m, n))
  gs = jnp.asarray(group_sizes, jnp.int32)

  def vjp(fn):
    out, back = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
    return out, back(dout)

  _assert_close(
      vjp(lambda a, b, g: gmm_lib.gmm(a, b, g, block_sizes=SMALL_GMM, interpret=INTERPRET)),
      vjp(gmm_lib.gmm_reference))
  _assert_close(gmm_lib.tgmm(lhs, dout, gs, block_sizes=SMALL_GMM, interpret=INTERPRET),
                gmm_lib.tgmm_reference(lhs, dout, gs))


@pytest.mark.parametrize("tq,tk", [(6, 0), (0, 6)])
def test_block_attention_zero_length_matches_reference(tq, tk):
  """No key (every query sees nothing: zeros) or no query; was a trace error."""
  q_meta = masks.make_meta(jnp.arange(tq)[None], 3, masks.NOISY)
  kv_meta = masks.make_meta(jnp.arange(tk)[None], 3, masks.CLEAN)
  q, k, v, do = _normal(2, (1, tq, 2, 16), (1, tk, 1, 16), (1, tk, 1, 16), (1, tq, 2, 16))

  def vjp(fn):
    out, back = jax.vjp(lambda q, k, v: fn(q, k, v, q_meta, kv_meta), q, k, v)
    return out, back(do)

  _assert_close(vjp(lambda *a: ba.block_attention(*a, interpret=INTERPRET)),
                vjp(ba.masked_attention))


@pytest.mark.parametrize("tq,s", [(3, 0), (0, 20)])
def test_decode_attention_zero_length_outputs_zeros(tq, s):
  """An empty cache gives zeros (the split layout divided by zero)."""
  q, k, v = _normal(3, (2, tq, 4, 16), (2, s, 2, 16), (2, s, 2, 16))
  out = da.decode_attention(q, k, v, interpret=INTERPRET)
  _assert_close(out, da.reference_attention(q, k, v))
  assert not np.any(np.asarray(out))


# ------------------------------------------------------- broadcasting metadata


def test_block_attention_accepts_metadata_fields_that_broadcast():
  """One row of segment ids for a batch of 2: ``mask_fn`` and the reference
  broadcast it, packing the metadata for the kernel used to fail."""
  pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
  seg = jnp.asarray([[0] * 6 + [1] * 3 + [-1]], jnp.int32)  # [1, T]
  meta = masks.make_meta(pos, 4, masks.CLEAN, segment_ids=seg)
  q, k, v, do = _normal(4, (2, 10, 2, 16), (2, 10, 1, 16), (2, 10, 1, 16), (2, 10, 2, 16))

  def vjp(fn):
    out, back = jax.vjp(fn, q, k, v)
    return out, back(do)

  got = jax.jit(lambda: vjp(lambda q, k, v: ba.block_attention(
      q, k, v, meta, meta, block_sizes=SMALL_ATTN, interpret=INTERPRET)))()
  _assert_close(got, vjp(lambda q, k, v: ba.masked_attention(q, k, v, meta, meta)))
  bad = masks.make_meta(pos, 4, masks.CLEAN, segment_ids=jnp.zeros((3, 10), jnp.int32))
  with pytest.raises(ValueError, match="q_meta fields do not broadcast"):
    ba.block_attention(q, k, v, bad, meta, interpret=INTERPRET)
