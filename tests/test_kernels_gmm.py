"""Tests of the grouped-matmul Pallas kernels (interpret mode) and their cuda lowering."""

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET, TRITON_CALL
from pallas_kernels import gmm as gmm_lib

SMALL = gmm_lib.GmmBlockSizes(block_m=16, block_k=16, block_n=16, num_warps=4,
                              num_stages=2)
pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def _loop_gmm(lhs, rhs, group_sizes):
  """Independent per-group numpy reference (fp64)."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _loop_tgmm(lhs, dout, group_sizes):
  lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  out = np.zeros((len(group_sizes), lhs.shape[1], dout.shape[1]))
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    out[g] = lhs[start:start + size].T @ dout[start:start + size]
    start += size
  return out


def _inputs(m, k, n, group_sizes, dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(len(group_sizes), k, n)) / np.sqrt(k), dtype)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)


def _tol(dtype):
  return dict(atol=1e-4, rtol=1e-4) if dtype == jnp.float32 else dict(atol=5e-2, rtol=5e-2)


CASES = [
    # (m, k, n, group_sizes)
    (64, 32, 32, [16, 16, 16, 16]),            # aligned groups
    (50, 40, 24, [7, 0, 20, 0, 13]),           # ragged K/N/M, empty groups, unused rows
    (48, 16, 48, [0, 48, 0]),                   # one group takes all rows
    (33, 24, 40, [0, 0, 0, 33]),                # leading empty groups
    (40, 32, 16, [3, 5, 1, 2, 9, 4, 6, 10]),    # many groups per tile
    (32, 32, 32, [0, 0]),                       # nothing routed: all zeros
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,group_sizes", CASES)
def test_gmm_forward_and_grads(m, k, n, group_sizes, dtype):
  lhs, rhs, gs = _inputs(m, k, n, group_sizes, dtype)
  rng = np.random.default_rng(1)
  dout = jnp.asarray(rng.normal(size=(m, n)), dtype)

  def op(a, b):
    return gmm_lib.gmm(a, b, gs, block_sizes=SMALL, interpret=INTERPRET)

  @jax.jit
  def fwd_bwd(a, b, dy):
    # One jitted call: eager interpret mode re-evaluates the kernels slowly.
    out, vjp = jax.vjp(op, a, b)
    return out, *vjp(dy)

  out, dlhs, drhs = fwd_bwd(lhs, rhs, dout)
  tol = _tol(dtype)
  assert out.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), _loop_gmm(lhs, rhs, gs), **tol)
  np.testing.assert_allclose(
      np.asarray(out, np.float32),
      np.asarray(gmm_lib.gmm_reference(lhs, rhs, gs), np.float32), **tol)
  # Gradients: ragged_dot's own VJP, and the closed forms via the numpy loop.
  ref_out, ref_vjp = jax.vjp(lambda a, b: gmm_lib.gmm_reference(a, b, gs), lhs, rhs)
  ref_dlhs, ref_drhs = ref_vjp(dout.astype(ref_out.dtype))
  np.testing.assert_allclose(np.asarray(dlhs, np.float32),
                             np.asarray(ref_dlhs, np.float32), **tol)
  np.testing.assert_allclose(np.asarray(drhs, np.float32),
                             np.asarray(ref_drhs, np.float32), **tol)
  np.testing.assert_allclose(np.asarray(drhs, np.float32), _loop_tgmm(lhs, dout, gs), **tol)
  # Rows past sum(group_sizes) are exact zeros, and so are their lhs gradients.
  total = int(np.sum(group_sizes))
  assert not np.any(np.asarray(out[total:], np.float32))
  assert not np.any(np.asarray(dlhs[total:], np.float32))


def test_gmm_preferred_element_type_and_default_tiles():
  lhs, rhs, gs = _inputs(40, 32, 32, [10, 0, 25], jnp.bfloat16)
  out = jax.jit(lambda a, b, g: gmm_lib.gmm(a, b, g, preferred_element_type=jnp.float32,
                                           interpret=INTERPRET))(lhs, rhs, gs)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _loop_gmm(lhs, rhs, gs), atol=2e-2, rtol=2e-2)


def test_gmm_under_jit_with_traced_group_sizes():
  lhs, rhs, _ = _inputs(48, 16, 16, [0, 0, 0], jnp.float32)
  fn = jax.jit(lambda a, b, g: gmm_lib.gmm(a, b, g, block_sizes=SMALL, interpret=INTERPRET))
  for sizes in ([48, 0, 0], [5, 30, 13], [0, 17, 2]):
    gs = jnp.asarray(sizes, jnp.int32)
    np.testing.assert_allclose(np.asarray(fn(lhs, rhs, gs)), _loop_gmm(lhs, rhs, gs),
                               atol=1e-4, rtol=1e-4)


def test_tgmm_direct():
  lhs, _, gs = _inputs(40, 24, 8, [12, 0, 28], jnp.float32)
  dout = jnp.asarray(np.random.default_rng(3).normal(size=(40, 40)), jnp.float32)
  out = jax.jit(lambda a, b, g: gmm_lib.tgmm(a, b, g, block_sizes=SMALL,
                                            interpret=INTERPRET))(lhs, dout, gs)
  np.testing.assert_allclose(np.asarray(out), _loop_tgmm(lhs, dout, gs), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(gmm_lib.tgmm_reference(lhs, dout, gs)),
                             _loop_tgmm(lhs, dout, gs), atol=1e-4, rtol=1e-4)


def test_schedule_covers_every_row_once():
  m, block_m = 50, 16
  gs = jnp.asarray([7, 0, 20, 0, 13], jnp.int32)
  tile, group, lo, hi = (np.asarray(x) for x in gmm_lib.make_schedule(gs, m, block_m))
  owner = np.full(m, -1)
  for t, g, a, b in zip(tile, group, lo, hi):
    rows = np.arange(t * block_m, min((t + 1) * block_m, m))
    rows = rows[(rows >= a) & (rows < b)]
    assert np.all(owner[rows] == -1), "row written twice"
    owner[rows] = g
  expected = np.repeat(np.arange(6), [7, 0, 20, 0, 13, 10])  # group 5 = zero group
  np.testing.assert_array_equal(owner, expected)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_m=24), "block_m"),
    (dict(block_n=8), "block_n"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages"),
])
def test_block_size_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gmm_lib.GmmBlockSizes(**kwargs)


def test_input_validation():
  lhs, rhs, gs = _inputs(16, 16, 16, [8, 8], jnp.float32)
  with pytest.raises(ValueError, match="contraction"):
    gmm_lib.gmm(lhs[:, :8], rhs, gs, interpret=INTERPRET)
  with pytest.raises(ValueError, match="group_sizes"):
    gmm_lib.gmm(lhs, rhs, gs[:1], interpret=INTERPRET)
  with pytest.raises(ValueError, match="dtypes differ"):
    gmm_lib.gmm(lhs.astype(jnp.bfloat16), rhs, gs, interpret=INTERPRET)


def test_gmm_lowers_for_cuda():
  """Exports forward + both backward kernels for CUDA from this CPU-only machine.

  Pallas generates the Triton IR in Python, so a Triton lowering error fails
  here. The Triton custom call has no stability guarantee, hence the disabled
  export check; PTX compilation itself happens only on a GPU.
  """
  m, k, n, g = 512, 256, 384, 8

  def fwd_bwd(lhs, rhs, group_sizes):
    def loss(a, b):
      return jnp.sum(gmm_lib.gmm(a, b, group_sizes,
                                 preferred_element_type=jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)

  exported = export.export(
      jax.jit(fwd_bwd), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
          jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
          jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((g,), jnp.int32))
  text = exported.mlir_module()
  assert exported.platforms == ("cuda",)
  assert text.count(TRITON_CALL) == 3
  for name in ('name = "gmm"', 'name = "gmm_t"', 'name = "tgmm"'):
    assert name in text


def test_manual_axes_align_and_out_struct_inside_shard_map():
  # pallas_call inside shard_map needs outputs typed with the operands' varying axes.
  from pallas_kernels import manual_axes  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  seen = {}

  def body(a, b):
    a2, b2 = manual_axes.align(a, b)
    seen["vma"] = (manual_axes._varying(a), manual_axes._varying(b),  # pylint: disable=protected-access
                   manual_axes._varying(a2), manual_axes._varying(b2))  # pylint: disable=protected-access
    seen["out"] = manual_axes.out_struct((2,), jnp.float32, b2).manual_axis_type.varying
    return a2 + b2

  P = jax.sharding.PartitionSpec
  f = jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
  out = jax.jit(f)(jnp.ones((2,)), jnp.ones((2,)))
  np.testing.assert_array_equal(out, 2.0)
  assert seen["vma"] == (frozenset({"x"}), frozenset(), frozenset({"x"}), frozenset({"x"}))
  assert seen["out"] == frozenset({"x"})
  # Outside shard_map: no manual axes, plain structs.
  assert manual_axes.out_struct((2,), jnp.float32, jnp.ones(2)).manual_axis_type is None
