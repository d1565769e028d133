"""Public grouped-matmul op with a custom VJP built from the Pallas kernels."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend
from pallas_kernels.gmm import kernel
from pallas_kernels.gmm import reference
from pallas_kernels import manual_axes

Array = Any
GmmBlockSizes = kernel.GmmBlockSizes

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _validate(lhs: Array, rhs: Array, group_sizes: Array) -> None:
  if lhs.ndim != 2:
    raise ValueError(f"gmm: lhs must be [M, K], got shape {lhs.shape}")
  if rhs.ndim != 3:
    raise ValueError(f"gmm: rhs must be [G, K, N], got shape {rhs.shape}")
  if rhs.shape[1] != lhs.shape[1]:
    raise ValueError(f"gmm: contraction mismatch, lhs {lhs.shape} vs rhs {rhs.shape}")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"gmm: group_sizes must be [G={rhs.shape[0]}], "
                     f"got shape {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"gmm: group_sizes must be integer, got {group_sizes.dtype}")
  if lhs.dtype != rhs.dtype:
    raise ValueError(f"gmm: lhs and rhs dtypes differ: {lhs.dtype} vs {rhs.dtype}")
  if lhs.dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"gmm: dtype must be float32 or bfloat16, got {lhs.dtype}")
  if rhs.shape[0] < 1:
    raise ValueError(f"gmm: need at least one group, got G={rhs.shape[0]}")
  _check_nonnegative("gmm", group_sizes)


def _check_nonnegative(op: str, group_sizes: Array) -> None:
  """Refuses concrete negative sizes; traced ones count as empty groups (kernel.group_bounds)."""
  if isinstance(group_sizes, jax.core.Tracer):
    return
  sizes = np.asarray(group_sizes)
  if (sizes < 0).any():
    raise ValueError(f"{op}: group_sizes must be >= 0, got {sizes.tolist()}")


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        block_sizes: GmmBlockSizes = GmmBlockSizes(),
        preferred_element_type: Any = None, interpret: bool | None = None) -> Array:
  """Grouped matmul: row group g of ``lhs`` times ``rhs[g]``.

  Rows of ``lhs`` are sorted by group: rows ``[start_g, start_g + group_sizes[g])``
  use ``rhs[g]``, rows past ``sum(group_sizes)`` give zeros, empty groups are fine.
  Matches ``jax.lax.ragged_dot``. Accumulates in fp32.

  Args:
    lhs: [M, K] float32 or bfloat16.
    rhs: [G, K, N], same dtype as lhs.
    group_sizes: [G] integer rows per group (an array, or a list/tuple of ints);
      ``sum(group_sizes) <= M`` (larger sums are clipped to M). Concrete negative
      sizes raise; traced ones count as 0 (``ragged_dot`` leaves them undefined).
    block_sizes: kernel tile sizes.
    preferred_element_type: output dtype (default: lhs dtype).
    interpret: run the Pallas interpreter; None = unless the backend is a GPU.

  Returns:
    [M, N] in ``preferred_element_type``. Differentiable in lhs and rhs.
  """
  group_sizes = jnp.asarray(group_sizes)
  _validate(lhs, rhs, group_sizes)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if 0 in lhs.shape or 0 in rhs.shape:
    # No row, no contraction or no column: the tiling divides by these, and
    # ragged_dot's exact (empty or all-zero) answer costs nothing.
    return reference.gmm_reference(lhs, rhs, group_sizes, out_dtype)
  # Inside shard_map the operands are cast to one set of varying mesh axes here,
  # outside the custom VJP, so autodiff supplies the psum that transposes the cast.
  lhs, rhs, group_sizes = manual_axes.align(lhs, rhs, group_sizes.astype(jnp.int32))
  return _gmm(lhs, rhs, group_sizes, block_sizes, out_dtype, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, block_sizes, out_dtype, interpret):
  return backend.call(kernel.gmm_call, interpret, lhs, rhs, group_sizes,
                      block_sizes=block_sizes, out_dtype=out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, block_sizes, out_dtype, interpret):
  out = _gmm(lhs, rhs, group_sizes, block_sizes, out_dtype, interpret)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(block_sizes, out_dtype, interpret, residuals, dout):
  del out_dtype
  lhs, rhs, group_sizes = residuals
  # The kernels multiply same-dtype operands; the cotangent arrives in the
  # output dtype, so bring it to the input dtype (bf16 stays bf16 on the MMA).
  dout = dout.astype(lhs.dtype)
  dlhs = backend.call(kernel.gmm_call, interpret, dout, rhs, group_sizes,
                      block_sizes=block_sizes, out_dtype=lhs.dtype, transpose_rhs=True)
  drhs = backend.call(kernel.tgmm_call, interpret, lhs, dout, group_sizes,
                      block_sizes=block_sizes, out_dtype=rhs.dtype)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm(lhs: Array, dout: Array, group_sizes: Array, *,
         block_sizes: GmmBlockSizes = GmmBlockSizes(),
         preferred_element_type: Any = None, interpret: bool | None = None) -> Array:
  """Transposed grouped matmul: ``out[g] = lhs_g^T @ dout_g`` ([G, K, N]).

  This is the rhs gradient of ``gmm``; empty groups give zeros.

  Args:
    lhs: [M, K] float32 or bfloat16.
    dout: [M, N], same dtype as lhs.
    group_sizes: [G] integer rows per group, array or list/tuple (negative: as in ``gmm``).
    block_sizes: kernel tile sizes.
    preferred_element_type: output dtype (default: lhs dtype).
    interpret: run the Pallas interpreter; None = unless the backend is a GPU.

  Returns:
    [G, K, N].
  """
  group_sizes = jnp.asarray(group_sizes)
  if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
    raise ValueError(f"tgmm: need lhs [M, K] and dout [M, N], got {lhs.shape}, {dout.shape}")
  if lhs.dtype != dout.dtype or lhs.dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"tgmm: dtypes must match and be float32/bfloat16, got "
                     f"{lhs.dtype}, {dout.dtype}")
  if group_sizes.ndim != 1 or group_sizes.shape[0] < 1:
    raise ValueError(f"tgmm: group_sizes must be [G >= 1], got shape {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    # As gmm and ragged_dot do: a fractional size means nothing, and the kernel
    # would silently truncate it.
    raise ValueError(f"tgmm: group_sizes must be integer, got {group_sizes.dtype}")
  _check_nonnegative("tgmm", group_sizes)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if 0 in lhs.shape or 0 in dout.shape:
    # Nothing for the kernel to tile (it would divide by the empty dimension).
    return reference.tgmm_reference(lhs, dout, group_sizes, out_dtype)
  return backend.call(kernel.tgmm_call, interpret, lhs, dout, group_sizes.astype(jnp.int32),
                      block_sizes=block_sizes, out_dtype=out_dtype)
