"""Pallas (Triton backend) kernels of the grouped matmul used for MoE dispatch.

Two kernels:

* ``gmm``: ``out[rows of group g] = lhs[rows of group g] @ rhs[g]`` (optionally
  with ``rhs[g]`` transposed, which is the lhs gradient).
* ``tgmm`` ("transposed GMM"): ``out[g] = lhs_g^T @ dout_g``, the rhs gradient.

The GMM grid is ``(n_tiles, num_steps)``. A step is one (group, row tile) pair of a
schedule computed in plain jnp before the kernel (the TPU megablox design): a row
tile that straddles a group boundary is visited once per group it touches, and each
visit stores only the rows of its group, so every output element has exactly one
writer and no atomics or zero-initialisation are needed. Rows past
``sum(group_sizes)`` belong to an extra "zero group" whose visits skip the matmul
and store zeros. The Triton program ids map to CUDA ``x, y``, so the n tiles of one
step run next to each other and share the lhs tile in L2.
"""

import dataclasses
import functools
import numbers
from typing import Any

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import manual_axes

Array = Any


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_pow2(x: int) -> bool:
  # A non-integer tile (64.0, None) is False here, refused naming its field: ``&``
  # raised a TypeError that named neither.
  return _is_int(x) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes:
  """Tile sizes of the grouped matmul kernels.

  Triton needs power-of-two tensor shapes and ``tl.dot`` operands of at least 16
  along every axis, hence the validation. The defaults suit bf16 on an H100.

  Attributes:
    block_m: rows of lhs per tile (the reduction tile of ``tgmm``).
    block_k: contraction tile of ``gmm`` (output-row tile of ``tgmm``).
    block_n: output-column tile.
    num_warps: Triton warps per program.
    num_stages: software-pipelining depth of the inner loop.
  """

  block_m: int = 128
  block_k: int = 64
  block_n: int = 128
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      value = getattr(self, name)
      if not _is_pow2(value) or value < 16:
        raise ValueError(
            f"GmmBlockSizes.{name} must be a power of two >= 16, got {value}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"GmmBlockSizes.num_warps must be a power of two <= 16, "
                       f"got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"GmmBlockSizes.num_stages must be >= 1, got {self.num_stages}")


def fit_block(block: int, dim: int) -> int:
  """Shrinks a tile to the smallest power of two >= 16 that covers ``dim``."""
  return max(16, min(block, pl.next_power_of_2(dim)))


def group_bounds(group_sizes: Array, m: int) -> tuple[Array, Array]:
  """Returns [G] start and end rows of each group, clipped to ``m``.

  A negative size counts as an empty group: it would otherwise make the bounds
  decrease, and the schedule would then leave output rows unwritten.
  """
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def num_schedule_steps(m: int, num_groups: int, block_m: int) -> int:
  """Static upper bound on the (group, row tile) visits of the GMM schedule.

  The G real groups plus the zero group partition [0, m); each boundary between
  two non-empty groups can add one visit to the ``cdiv(m, block_m)`` tiles.
  """
  return pl.cdiv(m, block_m) + num_groups


def make_schedule(group_sizes: Array, m: int, block_m: int) -> tuple[Array, ...]:
  """Maps each GMM grid step to (row tile, group, first row, end row).

  Runs as ordinary XLA ops before the kernel.

  Args:
    group_sizes: [G] int32 rows per group.
    m: number of lhs rows.
    block_m: row tile.

  Returns:
    (tile, group, row_lo, row_hi), each [num_schedule_steps] int32. ``group == G``
    is the zero group (rows past the last group); unused trailing steps have
    ``row_lo == row_hi == 0`` and store nothing.
  """
  num_groups = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, m)
  total = ends[-1]
  starts = jnp.concatenate([starts, total[None]])
  ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  nonempty = ends > starts
  first = starts // block_m
  last = jnp.maximum(ends - 1, 0) // block_m
  visits = jnp.where(nonempty, last - first + 1, 0)
  visit_end = jnp.cumsum(visits)
  visit_start = visit_end - visits
  steps = jnp.arange(num_schedule_steps(m, num_groups, block_m), dtype=jnp.int32)
  group = jnp.searchsorted(visit_end, steps, side="right").astype(jnp.int32)
  valid = group <= num_groups
  group = jnp.minimum(group, num_groups)
  tile = jnp.where(valid, first[group] + steps - visit_start[group], 0)
  row_lo = jnp.where(valid, starts[group], 0)
  row_hi = jnp.where(valid, ends[group], 0)
  return tile, group, row_lo, row_hi


def _dot(a: Array, b: Array, dims) -> Array:
  """fp32-accumulating dot; fp32 inputs use full precision, not TF32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *,
                m: int, k: int, n: int, num_groups: int, block_m: int,
                block_k: int, block_n: int, transpose_rhs: bool):
  """One (n tile, schedule step) of ``out = lhs @ rhs[g]`` (or ``rhs[g]^T``)."""
  j = pl.program_id(0)
  step = pl.program_id(1)
  tile = tile_ref[step]
  group = group_ref[step]
  row_lo = lo_ref[step]
  row_hi = hi_ref[step]
  rows = tile * block_m + jnp.arange(block_m)
  cols = j * block_n + jnp.arange(block_n)
  # The zero group and empty padding steps skip the matmul: their tiles only
  # store zeros (or nothing).
  has_work = (group < num_groups) & (row_hi > row_lo)
  g = jnp.minimum(group, num_groups - 1)
  row_in = (rows < m)[:, None]
  col_in = (cols < n)
  k_ragged = k % block_k != 0

  def body(kk, acc):
    ks = kk * block_k + jnp.arange(block_k)
    k_in = ks < k
    # Masks only where a tile can run off the array (static checks); rows of a
    # neighbouring group are loaded and multiplied but never stored. The
    # contraction mask must zero both operands: garbage there would reach every
    # output element.
    lhs_mask = row_in if m % block_m else None
    if k_ragged:
      lhs_mask = k_in[None, :] if lhs_mask is None else lhs_mask & k_in[None, :]
    x = plgpu.load(lhs_ref.at[pl.ds(tile * block_m, block_m), pl.ds(kk * block_k, block_k)],
                   mask=lhs_mask, other=0 if lhs_mask is not None else None)
    if transpose_rhs:
      rhs_mask = col_in[:, None] if n % block_n else None
      if k_ragged:
        rhs_mask = k_in[None, :] if rhs_mask is None else rhs_mask & k_in[None, :]
      w = plgpu.load(rhs_ref.at[g, pl.ds(j * block_n, block_n), pl.ds(kk * block_k, block_k)],
                     mask=rhs_mask, other=0 if rhs_mask is not None else None)
      dims = (((1,), (1,)), ((), ()))
    else:
      rhs_mask = col_in[None, :] if n % block_n else None
      if k_ragged:
        rhs_mask = k_in[:, None] if rhs_mask is None else rhs_mask & k_in[:, None]
      w = plgpu.load(rhs_ref.at[g, pl.ds(kk * block_k, block_k), pl.ds(j * block_n, block_n)],
                     mask=rhs_mask, other=0 if rhs_mask is not None else None)
      dims = (((1,), (0,)), ((), ()))
    return acc + _dot(x, w, dims)

  zeros = jnp.zeros((block_m, block_n), jnp.float32)
  # A static trip count under a cond (rather than a dynamic trip count) keeps the
  # loop pipelinable, and a dynamic upper bound against the constant lower bound
  # produced an scf.for with mixed-width bounds that Triton rejected.
  acc = lax.cond(has_work, lambda: lax.fori_loop(0, pl.cdiv(k, block_k), body, zeros),
                 lambda: zeros)
  store_mask = ((rows >= row_lo) & (rows < row_hi))[:, None] & col_in[None, :]
  plgpu.store(out_ref.at[pl.ds(tile * block_m, block_m), pl.ds(j * block_n, block_n)],
              acc.astype(out_ref.dtype), mask=store_mask)


def gmm_call(lhs: Array, rhs: Array, group_sizes: Array, *, block_sizes: GmmBlockSizes,
             out_dtype: Any, transpose_rhs: bool = False,
             interpret: bool = False) -> Array:
  """Runs the GMM kernel; see ``ops.gmm`` for the semantics.

  Args:
    lhs: [M, K].
    rhs: [G, K, N], or [G, N, K] when ``transpose_rhs``.
    group_sizes: [G] int32.
    block_sizes: tile sizes.
    out_dtype: dtype of the [M, N] result.
    transpose_rhs: multiply by ``rhs[g]^T``.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    [M, N] in ``out_dtype``.
  """
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block_m = fit_block(block_sizes.block_m, m)
  block_k = fit_block(block_sizes.block_k, k)
  block_n = fit_block(block_sizes.block_n, n)
  schedule = make_schedule(group_sizes, m, block_m)
  num_steps = schedule[0].shape[0]
  kernel = functools.partial(
      _gmm_kernel, m=m, k=k, n=n, num_groups=num_groups, block_m=block_m,
      block_k=block_k, block_n=block_n, transpose_rhs=transpose_rhs)
  *schedule, lhs, rhs = manual_axes.align(*schedule, lhs, rhs)
  return pl.pallas_call(
      kernel,
      out_shape=manual_axes.out_struct((m, n), out_dtype, lhs),
      grid=(pl.cdiv(n, block_n), num_steps),
      # Passing Triton compiler params also selects the Triton backend (newer
      # JAX defaults GPU pallas_call to Mosaic GPU).
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="gmm_t" if transpose_rhs else "gmm",
  )(*schedule, lhs, rhs)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, m: int, k: int,
                 n: int, block_m: int, block_k: int, block_n: int):
  """One (n tile, k tile, group) of ``out[g] = lhs_g^T @ dout_g``."""
  j = pl.program_id(0)
  i = pl.program_id(1)
  g = pl.program_id(2)
  lo = starts_ref[g]
  hi = ends_ref[g]
  first = lo // block_m
  # An empty group runs no iterations and stores zeros.
  stop = jnp.where(hi > lo, (hi - 1) // block_m + 1, first)
  ks = i * block_k + jnp.arange(block_k)
  cols = j * block_n + jnp.arange(block_n)
  k_in = ks < k
  col_in = cols < n

  def body(t, acc):
    rows = t * block_m + jnp.arange(block_m)
    # Rows of other groups must load as zero: they share the reduction axis.
    row_in = ((rows >= lo) & (rows < hi))[:, None]
    x_mask = row_in & k_in[None, :] if k % block_k else row_in
    y_mask = row_in & col_in[None, :] if n % block_n else row_in
    x = plgpu.load(lhs_ref.at[pl.ds(t * block_m, block_m), pl.ds(i * block_k, block_k)],
                   mask=x_mask, other=0)
    y = plgpu.load(dout_ref.at[pl.ds(t * block_m, block_m), pl.ds(j * block_n, block_n)],
                   mask=y_mask, other=0)
    return acc + _dot(x, y, (((0,), (0,)), ((), ())))

  acc = lax.fori_loop(first.astype(jnp.int32), stop.astype(jnp.int32), body,
                      jnp.zeros((block_k, block_n), jnp.float32))
  plgpu.store(out_ref.at[g, pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)],
              acc.astype(out_ref.dtype), mask=k_in[:, None] & col_in[None, :])
  del m


def tgmm_call(lhs: Array, dout: Array, group_sizes: Array, *, block_sizes: GmmBlockSizes,
              out_dtype: Any, interpret: bool = False) -> Array:
  """Runs the transposed GMM: [G, K, N] with ``out[g] = lhs_g^T @ dout_g``.

  Args:
    lhs: [M, K].
    dout: [M, N].
    group_sizes: [G] int32.
    block_sizes: tile sizes (block_m is the reduction tile here).
    out_dtype: dtype of the result.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    [G, K, N]; zeros for empty groups.
  """
  m, k = lhs.shape
  n = dout.shape[1]
  num_groups = group_sizes.shape[0]
  block_m = fit_block(block_sizes.block_m, m)
  block_k = fit_block(block_sizes.block_k, k)
  block_n = fit_block(block_sizes.block_n, n)
  starts, ends = group_bounds(group_sizes, m)
  kernel = functools.partial(_tgmm_kernel, m=m, k=k, n=n, block_m=block_m,
                             block_k=block_k, block_n=block_n)
  starts, ends, lhs, dout = manual_axes.align(starts, ends, lhs, dout)
  return pl.pallas_call(
      kernel,
      out_shape=manual_axes.out_struct((num_groups, k, n), out_dtype, lhs),
      grid=(pl.cdiv(n, block_n), pl.cdiv(k, block_k), num_groups),
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="tgmm",
  )(starts, ends, lhs, dout)
