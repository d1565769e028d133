"""Split-K (flash-decoding) Pallas kernel: a short query block against a long KV cache.

Decoding attends a few query tokens (one diffusion block, e.g. 32) to a cache of
up to ~10^5 keys. One program per (batch row, kv head) would leave most of a GPU
idle and stream the whole cache through a single SM, so the cache length is cut
into ``num_splits`` contiguous chunks that run as separate programs. Each writes
a partial result -- unnormalised fp32 output, running max and running sum (base
2) -- and ``combine`` merges the chunks with the log-sum-exp rule in XLA (a small
reduction over the splits that XLA fuses).

Grouped-query attention: the ``G = H / Hkv`` query heads sharing a KV head are
folded into the rows of one tile together with the query tokens, so a program
computes ``[Tq * G, D] x [D, block_k]`` matmuls -- 128 rows for a 32-token block
and 4 groups -- and reads each K/V tile once for all of them.

Visibility of cache slot j to query row r of batch row b:
  ``j < kv_lengths[b]`` and ``kv_pos[b, j] >= 0`` and
  ``kv_pos[b, j] // block_size <= q_pos[b, r] // block_size``
(``block_size = 1``: causal in positions; the diffusion block size: block-causal).
A chunk's loop stops at ``kv_lengths[b]``, so unused cache capacity costs nothing
beyond the program launch.

Layouts inside the kernel: q as [B, Hkv, M, D] with M = Tq * G rows (token-major),
k/v in the caller's [B, S, Hkv, D] layout, positions int32, partial outputs
[B, Hkv, splits, M, D] and [B, Hkv, splits, M].
"""

import dataclasses
import functools
import math
import numbers
from typing import Any

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels import manual_axes

Array = Any

# Finite stand-in for -inf (keeps m_prev - m_next finite for rows masked so far).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_pow2(x: int) -> bool:
  # A non-integer tile (64.0, None) is False here, refused naming its field: ``&``
  # raised a TypeError that named neither.
  return _is_int(x) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiles and launch options of the split-K decode kernel.

  Attributes:
    block_m: query rows (tokens x grouped heads) per program; power of two >= 16.
    block_k: cache slots per inner step; power of two >= 16.
    num_splits: chunks of the cache length run in parallel; None picks enough
      programs to fill a GPU (``target_programs``).
    target_programs: programs aimed at when ``num_splits`` is None (2 waves of an
      H100/H200's 132 SMs).
    num_warps: Triton warps per program; None = 4 for head_dim <= 64, else 8 (the
      fp32 [block_m, head_dim] accumulator lives in registers).
    num_stages: software-pipelining depth of the K/V loads.
  """

  block_m: int = 128
  block_k: int = 64
  num_splits: int | None = None
  target_programs: int = 264
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_m", "block_k"):
      value = getattr(self, name)
      if not _is_pow2(value) or value < 16:
        raise ValueError(f"DecodeBlockSizes.{name} must be a power of two >= 16, got {value}")
    # Integers: a float count (2.0) made the chunk length a float, which failed
    # deep in the BlockSpecs.
    if self.num_splits is not None and (not _is_int(self.num_splits) or self.num_splits < 1):
      raise ValueError(f"DecodeBlockSizes.num_splits must be an integer >= 1, got "
                       f"{self.num_splits!r}")
    if self.target_programs < 1:
      raise ValueError(f"DecodeBlockSizes.target_programs must be >= 1, got "
                       f"{self.target_programs}")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"DecodeBlockSizes.num_warps must be a power of two <= 16, got "
                       f"{self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"DecodeBlockSizes.num_stages must be >= 1, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class SplitLayout:
  """How a cache of ``length`` slots is cut into ``num_splits`` chunks of ``chunk``."""

  num_splits: int
  chunk: int  # Slots per split, a multiple of block_k.
  block_k: int

  @property
  def padded_length(self) -> int:
    return self.num_splits * self.chunk


def split_layout(length: int, programs_per_split: int, bs: DecodeBlockSizes) -> SplitLayout:
  """Chooses the split count (explicit or GPU-filling) and the chunk size."""
  block_k = max(16, min(bs.block_k, pl.next_power_of_2(length)))
  tiles = -(-length // block_k)
  if not tiles:
    # An empty cache (decode_attention runs no kernel for it): no split, where
    # the chunk arithmetic below divided by zero.
    return SplitLayout(0, block_k, block_k)
  if bs.num_splits is None:
    splits = -(-bs.target_programs // max(programs_per_split, 1))
  else:
    splits = bs.num_splits
  splits = max(1, min(splits, tiles))  # No split without a tile to work on.
  chunk = -(-tiles // splits) * block_k
  # Fewer splits when rounding the chunk up left trailing splits empty.
  splits = -(-length // chunk)
  return SplitLayout(splits, chunk, block_k)


def _dot(a: Array, b: Array, dims) -> Array:
  """fp32-accumulating dot; fp32 inputs use full precision, not TF32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _split_kernel(len_ref, q_ref, qpos_ref, k_ref, v_ref, kpos_ref, o_ref, m_ref, l_ref, *,
                  scale: float, block_k: int, chunk: int, block_size: int):
  """One (batch row, kv head, row tile, split): online softmax over the split's slots."""
  block_m, head_dim = q_ref.shape
  split = pl.program_id(3)
  start = split * chunk
  # Only slots below the row's cache length are visited.
  valid = jnp.clip(len_ref[0] - start, 0, chunk)
  num_tiles = (valid + block_k - 1) // block_k
  q = q_ref[...]
  q_block = qpos_ref[...] // block_size if block_size > 1 else qpos_ref[...]
  qk_scale = scale * LOG2_E

  def body(t, carry):
    o, m_prev, l_prev = carry
    sl = pl.ds(t * block_k, block_k)
    kpos = kpos_ref[sl]
    k_block = kpos // block_size if block_size > 1 else kpos
    slot = t * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    key_ok = (slot < valid) & (kpos >= 0)
    mask = key_ok[None, :] & (k_block[None, :] <= q_block[:, None])
    k = k_ref[sl, :]
    s = _dot(q, k, _NT) * qk_scale
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    # Zeroed explicitly: a row masked in this whole tile would otherwise add 1 per key.
    p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
    l_next = l_prev * correction + jnp.sum(p, axis=1)
    v = v_ref[sl, :]
    o = o * correction[:, None] + _dot(p.astype(v.dtype), v, _NN)
    return o, m_next, l_next

  init = (jnp.zeros((block_m, head_dim), jnp.float32),
          jnp.full((block_m,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_m,), jnp.float32))
  o, m, l = lax.fori_loop(0, num_tiles, body, init)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def split_forward(q: Array, q_pos: Array, k: Array, v: Array, kv_pos: Array,
                  kv_lengths: Array, *, layout: SplitLayout, scale: float, block_m: int,
                  block_size: int, block_sizes: DecodeBlockSizes,
                  interpret: bool) -> tuple[Array, Array, Array]:
  """Partial attention of every split, on padded inputs.

  Args:
    q: [B, Hkv, M, D] with M a multiple of block_m and D a power of two >= 16.
    q_pos: int32 [B, M] position of each row (-1: a padding row, sees nothing).
    k: [B, S, Hkv, D] with S = layout.padded_length.
    v: [B, S, Hkv, D].
    kv_pos: int32 [B, S] position of each slot (< 0: empty slot).
    kv_lengths: int32 [B, 1] slots in use per row.
    layout: the split layout.
    scale: logit scale.
    block_m: rows per program.
    block_size: positions per visibility block (1 = causal).
    block_sizes: launch options.
    interpret: run the Pallas interpreter.

  Returns:
    (o [B, Hkv, splits, M, D] fp32 unnormalised, m [B, Hkv, splits, M] running max
    in base 2, l [B, Hkv, splits, M] running sum).
  """
  b, hkv, rows, d = q.shape
  splits, chunk = layout.num_splits, layout.chunk
  kernel = functools.partial(_split_kernel, scale=scale, block_k=layout.block_k, chunk=chunk,
                             block_size=block_size)
  stat = pl.BlockSpec((None, None, None, block_m), lambda i, h, r, s: (i, h, s, r))
  operands = manual_axes.align(kv_lengths, q, q_pos, k, v, kv_pos)
  q = operands[1]
  num_warps = block_sizes.num_warps or (4 if d <= 64 else 8)
  return pl.pallas_call(
      kernel,
      grid=(b, hkv, rows // block_m, splits),
      in_specs=[
          pl.BlockSpec((None, 1), lambda i, h, r, s: (i, 0)),
          pl.BlockSpec((None, None, block_m, d), lambda i, h, r, s: (i, h, r, 0)),
          pl.BlockSpec((None, block_m), lambda i, h, r, s: (i, r)),
          pl.BlockSpec((None, chunk, None, d), lambda i, h, r, s: (i, s, h, 0)),
          pl.BlockSpec((None, chunk, None, d), lambda i, h, r, s: (i, s, h, 0)),
          pl.BlockSpec((None, chunk), lambda i, h, r, s: (i, s)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_m, d), lambda i, h, r, s: (i, h, s, r, 0)),
          stat,
          stat,
      ],
      # Inside shard_map (varying-axes checks on) every output must say which
      # mesh axes it varies over: the union of the operands', after ``align``.
      out_shape=[manual_axes.out_struct((b, hkv, splits, rows, d), jnp.float32, q),
                 manual_axes.out_struct((b, hkv, splits, rows), jnp.float32, q),
                 manual_axes.out_struct((b, hkv, splits, rows), jnp.float32, q)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="decode_attention_split",
  )(*operands)


def combine(o: Array, m: Array, l: Array) -> Array:
  """Merges the splits' partial results: [..., splits, M, D] -> [..., M, D] fp32.

  With per-split max m_s and sum l_s (base 2), the exact softmax output is
  ``sum_s 2^(m_s - m*) o_s / sum_s 2^(m_s - m*) l_s`` with ``m* = max_s m_s``.
  Rows that saw no key in any split (total sum 0) get zeros.
  """
  m_max = jnp.max(m, axis=-2, keepdims=True)
  w = jnp.exp2(m - m_max)  # [..., splits, M]; empty splits have l_s = 0.
  denom = jnp.sum(w * l, axis=-2)
  num = jnp.sum(w[..., None] * o, axis=-3)
  safe = jnp.where(denom > 0, denom, 1.0)
  return jnp.where((denom > 0)[..., None], num / safe[..., None], 0.0)
