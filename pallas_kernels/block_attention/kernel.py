"""Pallas (Triton backend) flash-attention kernels with a metadata-derived mask.

The mask of every [block_q, block_k] tile is computed inside the kernel by calling
``blockdiff_jax.masks.mask_fn`` on a [block_q, 1] × [1, block_k] tile of
token metadata, so the kernel and the XLA path share one definition of the rules.

Fully masked tiles are skipped. ``tile_map`` first classifies every
(q tile, k tile) pair as EMPTY / PARTIAL / FULL with the same ``mask_fn`` (one
fused XLA reduction per call, shared by all heads). Each kernel loop step reads one
int32 state and wraps the metadata loads, the mask, the K/V (or Q/dO) loads and the
matmuls in a ``lax.cond`` (an ``scf.if`` in Triton), so an EMPTY tile costs one
scalar load and a branch: its loads are skipped too. FULL tiles also skip the
element-mask arithmetic. (The loop still steps over every tile: with arbitrary
metadata the visible range is not contiguous.)

Softmax statistics are fp32 and in base 2 (``exp2``); the forward saves the
per-row logsumexp so the backward recomputes probabilities (FlashAttention-2).
Rows that see no key output zero and get zero gradients.

Layouts inside the kernels: q/k/v/o keep the caller's [B, T, H, D] layout (the
BlockSpecs pick one head); metadata is packed as int32 [B, 5, T] (fields in
``TokenMeta`` order, ``is_summary`` as 0/1); lse and delta are [B, H, T].
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

from blockdiff_jax import masks
from pallas_kernels import manual_axes

Array = Any

# Finite stand-in for -inf: keeps ``m_prev - m_next`` finite for rows that have
# seen only masked logits so far.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)
NUM_META_FIELDS = 5


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_pow2(x: int) -> bool:
  # A non-integer tile (64.0, None) is False here, refused naming its field: ``&``
  # raised a TypeError that named neither.
  return _is_int(x) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tile sizes of the block-attention kernels.

  Triton needs power-of-two tiles of at least 16 (``tl.dot``). Defaults target an
  H100 with head_dim 128 in bf16.

  Attributes:
    block_q: query tile of the forward kernel.
    block_k: key tile of the forward kernel.
    block_q_bwd: query tile of the dq and dk/dv kernels.
    block_k_bwd: key tile of the dq and dk/dv kernels.
    num_warps: Triton warps per program; None = 4 for head_dim <= 64, else 8.
    num_stages: software-pipelining depth.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if not _is_pow2(value) or value < 16:
        raise ValueError(
            f"AttentionBlockSizes.{name} must be a power of two >= 16, got {value}")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"AttentionBlockSizes.num_warps must be a power of two <= 16, "
                       f"got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"AttentionBlockSizes.num_stages must be >= 1, got {self.num_stages}")


def fit_block(block: int, length: int) -> int:
  """Shrinks a tile to the smallest power of two >= 16 covering ``length``."""
  return max(16, min(block, pl.next_power_of_2(length)))


def pack_meta(meta: masks.TokenMeta, length: int) -> Array:
  """Packs metadata into int32 [B, 5, length]; padded tokens get segment -1."""
  # Fields may broadcast against each other (``mask_fn`` allows it, e.g. one row
  # of segment ids for a batch); stacking needs them at the full shape.
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in dataclasses.astuple(meta)))
  fields = [jnp.broadcast_to(jnp.asarray(x).astype(jnp.int32), shape)
            for x in dataclasses.astuple(meta)]
  return pack_meta_pad(jnp.stack(fields, axis=1), length)


def pack_meta_pad(packed: Array, length: int) -> Array:
  """Pads packed [B, 5, T] metadata to ``length`` with never-visible tokens."""
  pad = length - packed.shape[-1]
  if pad <= 0:
    return packed
  # Segment -1 is never attended to (masks.mask_fn), and as a query it sees
  # nothing, so padded rows output zeros and get no gradient.
  fill = jnp.array([0, 0, masks.CLEAN, -1, 0], jnp.int32)[None, :, None]
  return jnp.concatenate(
      [packed, jnp.broadcast_to(fill, packed.shape[:2] + (pad,))], axis=-1)


def _tile_meta(meta_ref, sl, axis: int) -> masks.TokenMeta:
  """Loads one tile of packed metadata as a TokenMeta of [n, 1] or [1, n] fields."""
  fields = [meta_ref[f, sl] for f in range(NUM_META_FIELDS)]
  fields = [jnp.expand_dims(x, axis) for x in fields]
  return masks.TokenMeta(positions=fields[0], block_ids=fields[1], stream=fields[2],
                         segment_ids=fields[3], is_summary=fields[4] != 0)


EMPTY, PARTIAL, FULL = 0, 1, 2


def tile_map(q_meta: Array, kv_meta: Array, spec: masks.MaskSpec, block_q: int,
             block_k: int) -> Array:
  """Classifies every (q tile, k tile) as EMPTY, PARTIAL or FULL: int32 [B, nq, nk].

  Evaluates the same ``masks.mask_fn`` once per batch row on a
  [B, nq, nk, block_q, block_k] broadcast that XLA fuses into one reduction (no
  mask is materialised). Doing this once, instead of per head inside the kernel,
  matters: with tensor cores the mask arithmetic of a tile costs about as much
  as its two matmuls, so a kernel that evaluated the mask of every skipped tile
  for every head would gain little from skipping.
  """
  b, _, tq = q_meta.shape
  tk = kv_meta.shape[-1]
  nq, nk = tq // block_q, tk // block_k

  def unpack(packed, shape):
    f = [packed[:, i].reshape(shape) for i in range(NUM_META_FIELDS)]
    return masks.TokenMeta(positions=f[0], block_ids=f[1], stream=f[2],
                           segment_ids=f[3], is_summary=f[4] != 0)

  qm = unpack(q_meta, (b, nq, 1, block_q, 1))
  km = unpack(kv_meta, (b, 1, nk, 1, block_k))
  count = jnp.sum(masks.mask_fn(qm, km, spec), axis=(3, 4), dtype=jnp.int32)
  return jnp.where(count == 0, EMPTY, jnp.where(count == block_q * block_k, FULL, PARTIAL))


def _tile_mask(state, q_meta_fn, k_meta_fn, spec, shape):
  """The element mask of a visited tile; FULL tiles skip the mask arithmetic."""
  return lax.cond(state == FULL, lambda: jnp.ones(shape, jnp.bool_),
                  lambda: masks.mask_fn(q_meta_fn(), k_meta_fn(), spec))


def _dot(a: Array, b: Array, dims=(((1,), (0,)), ((), ()))) -> Array:
  """fp32-accumulating dot; fp32 inputs use full precision, not TF32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _compiler_params(block_sizes: AttentionBlockSizes, head_dim: int):
  num_warps = block_sizes.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=block_sizes.num_stages)


# --------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, qmeta_ref, kmeta_ref, map_ref, o_ref, lse_ref, *,
                spec: masks.MaskSpec, scale: float, block_k: int, num_k_tiles: int):
  """One (q tile, batch, head): online softmax over all key tiles."""
  block_q, head_dim = q_ref.shape
  q = q_ref[...]
  qk_scale = scale * LOG2_E

  def body(t, carry):
    k_sl = pl.ds(t * block_k, block_k)
    state = map_ref[t]

    def visit(carry):
      mask = _tile_mask(state, lambda: _tile_meta(qmeta_ref, slice(None), axis=1),
                        lambda: _tile_meta(kmeta_ref, k_sl, axis=0), spec,
                        (block_q, block_k))
      o, m_prev, l_prev = carry
      k = k_ref[k_sl, :]
      s = _dot(q, k, _NT) * qk_scale
      s = jnp.where(mask, s, MASK_VALUE)
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
      correction = jnp.exp2(m_prev - m_next)
      # Masked logits are zeroed explicitly: a row masked in this tile but not
      # before would otherwise contribute exp2(0) = 1 per key.
      p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
      l_next = l_prev * correction + jnp.sum(p, axis=1)
      v = v_ref[k_sl, :]
      o = o * correction[:, None] + _dot(p.astype(v.dtype), v)
      return o, m_next, l_next

    return lax.cond(state != EMPTY, visit, lambda c: c, carry)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  o, m, l = lax.fori_loop(0, num_k_tiles, body, init)
  visible = l > 0
  l_safe = jnp.where(visible, l, 1.0)
  o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
  # Rows that see nothing: any finite lse works, the backward masks them anyway.
  lse_ref[...] = jnp.where(visible, m + jnp.log2(l_safe), 0.0)


def forward(q: Array, k: Array, v: Array, q_meta: Array, kv_meta: Array, *,
            spec: masks.MaskSpec, scale: float, block_q: int, block_k: int,
            block_sizes: AttentionBlockSizes, interpret: bool) -> tuple[Array, Array]:
  """Forward kernel on padded inputs.

  Args:
    q: [B, Tq, H, D] with Tq a multiple of block_q.
    k: [B, Tk, Hkv, D] with Tk a multiple of block_k.
    v: [B, Tk, Hkv, D].
    q_meta: packed [B, 5, Tq].
    kv_meta: packed [B, 5, Tk].
    spec: static mask options.
    scale: logit scale.
    block_q: query tile.
    block_k: key tile.
    block_sizes: compiler options (warps, stages).
    interpret: run the Pallas interpreter.

  Returns:
    (out [B, Tq, H, D] in q's dtype, lse [B, H, Tq] fp32 in base 2).
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  nk = tk // block_k
  states = tile_map(q_meta, kv_meta, spec, block_q, block_k)
  kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, block_k=block_k,
                             num_k_tiles=nk)
  return pl.pallas_call(
      kernel,
      grid=(tq // block_q, b, h),
      in_specs=[
          pl.BlockSpec((None, block_q, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, tk, None, d), lambda i, j, hh: (j, 0, hh // groups, 0)),
          pl.BlockSpec((None, tk, None, d), lambda i, j, hh: (j, 0, hh // groups, 0)),
          pl.BlockSpec((None, NUM_META_FIELDS, block_q), lambda i, j, hh: (j, 0, i)),
          pl.BlockSpec((None, NUM_META_FIELDS, tk), lambda i, j, hh: (j, 0, 0)),
          pl.BlockSpec((None, None, nk), lambda i, j, hh: (j, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_q, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, j, hh: (j, hh, i)),
      ],
      out_shape=[manual_axes.out_struct(q.shape, q.dtype, q),
                 manual_axes.out_struct((b, h, tq), jnp.float32, q)],
      compiler_params=_compiler_params(block_sizes, d),
      interpret=interpret,
      name="block_attention_fwd",
  )(*manual_axes.align(q, k, v, q_meta, kv_meta, states))


# -------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, qmeta_ref, kmeta_ref, map_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, spec: masks.MaskSpec, scale: float, block_k: int,
               num_k_tiles: int):
  """One (q tile, batch, head): dq = scale * sum_k ds @ k."""
  block_q, head_dim = q_ref.shape
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  qk_scale = scale * LOG2_E

  def body(t, dq):
    k_sl = pl.ds(t * block_k, block_k)
    state = map_ref[t]

    def visit(dq):
      mask = _tile_mask(state, lambda: _tile_meta(qmeta_ref, slice(None), axis=1),
                        lambda: _tile_meta(kmeta_ref, k_sl, axis=0), spec,
                        (block_q, block_k))
      k = k_ref[k_sl, :]
      v = v_ref[k_sl, :]
      s = _dot(q, k, _NT) * qk_scale
      p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
      dp = _dot(do, v, _NT)
      ds = p * (dp - delta[:, None])
      return dq + _dot(ds.astype(k.dtype), k)

    return lax.cond(state != EMPTY, visit, lambda x: x, dq)

  dq = lax.fori_loop(0, num_k_tiles, body, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, qmeta_ref, kmeta_ref, map_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, spec: masks.MaskSpec, scale: float, block_q: int,
                 num_q_tiles: int, groups: int):
  """One (key tile, batch, kv head): sums dk, dv over the q heads of its group."""
  block_k, head_dim = k_ref.shape
  k = k_ref[...]
  v = v_ref[...]
  qk_scale = scale * LOG2_E

  def body(t, carry):
    q_sl = pl.ds(t * block_q, block_q)
    state = map_ref[t]

    def visit(carry):
      # The mask depends on the query tile only, not on the head: evaluate it
      # once for the (statically unrolled) heads of the group.
      mask = _tile_mask(state, lambda: _tile_meta(qmeta_ref, q_sl, axis=1),
                        lambda: _tile_meta(kmeta_ref, slice(None), axis=0), spec,
                        (block_q, block_k))
      dk, dv = carry
      for g in range(groups):
        q = q_ref[q_sl, g, :]
        do = do_ref[q_sl, g, :]
        lse = lse_ref[g, q_sl]
        delta = delta_ref[g, q_sl]
        s = _dot(q, k, _NT) * qk_scale
        p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        dp = _dot(do, v, _NT)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, _TN)
      return dk, dv

    return lax.cond(state != EMPTY, visit, lambda c: c, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, num_q_tiles, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q: Array, k: Array, v: Array, q_meta: Array, kv_meta: Array, out: Array,
             lse: Array, dout: Array, *, spec: masks.MaskSpec, scale: float,
             block_q: int, block_k: int, block_sizes: AttentionBlockSizes,
             interpret: bool) -> tuple[Array, Array, Array]:
  """dq, dk, dv on padded inputs (shapes as in ``forward``; lse from it)."""
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  # delta_i = sum_d o_i * do_i: a cheap elementwise reduction that XLA fuses.
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32),
                     dout.astype(jnp.float32))
  params = _compiler_params(block_sizes, d)
  nq, nk = tq // block_q, tk // block_k
  states = tile_map(q_meta, kv_meta, spec, block_q, block_k)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, scale=scale, block_k=block_k,
                        num_k_tiles=nk),
      grid=(tq // block_q, b, h),
      in_specs=[
          pl.BlockSpec((None, block_q, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, tk, None, d), lambda i, j, hh: (j, 0, hh // groups, 0)),
          pl.BlockSpec((None, tk, None, d), lambda i, j, hh: (j, 0, hh // groups, 0)),
          pl.BlockSpec((None, NUM_META_FIELDS, block_q), lambda i, j, hh: (j, 0, i)),
          pl.BlockSpec((None, NUM_META_FIELDS, tk), lambda i, j, hh: (j, 0, 0)),
          pl.BlockSpec((None, None, nk), lambda i, j, hh: (j, i, 0)),
          pl.BlockSpec((None, block_q, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, j, hh: (j, hh, i)),
          pl.BlockSpec((None, None, block_q), lambda i, j, hh: (j, hh, i)),
      ],
      out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, j, hh: (j, i, hh, 0)),
      out_shape=manual_axes.out_struct(q.shape, q.dtype, q),
      compiler_params=params,
      interpret=interpret,
      name="block_attention_dq",
  )(*manual_axes.align(q, k, v, q_meta, kv_meta, states, dout, lse, delta))

  # Group the q heads by kv head so one program sees all heads sharing its K/V.
  qg = q.reshape(b, tq, hkv, groups, d)
  dog = dout.reshape(b, tq, hkv, groups, d)
  lseg = lse.reshape(b, hkv, groups, tq)
  deltag = delta.reshape(b, hkv, groups, tq)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, spec=spec, scale=scale, block_q=block_q,
                        num_q_tiles=nq, groups=groups),
      grid=(tk // block_k, b, hkv),
      in_specs=[
          pl.BlockSpec((None, tq, None, groups, d), lambda i, j, hh: (j, 0, hh, 0, 0)),
          pl.BlockSpec((None, block_k, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, block_k, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, NUM_META_FIELDS, tq), lambda i, j, hh: (j, 0, 0)),
          pl.BlockSpec((None, NUM_META_FIELDS, block_k), lambda i, j, hh: (j, 0, i)),
          pl.BlockSpec((None, nq, None), lambda i, j, hh: (j, 0, i)),
          pl.BlockSpec((None, tq, None, groups, d), lambda i, j, hh: (j, 0, hh, 0, 0)),
          pl.BlockSpec((None, None, groups, tq), lambda i, j, hh: (j, hh, 0, 0)),
          pl.BlockSpec((None, None, groups, tq), lambda i, j, hh: (j, hh, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_k, None, d), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, block_k, None, d), lambda i, j, hh: (j, i, hh, 0)),
      ],
      out_shape=[manual_axes.out_struct(k.shape, k.dtype, q),
                 manual_axes.out_struct(v.shape, v.dtype, q)],
      compiler_params=params,
      interpret=interpret,
      name="block_attention_dkdv",
  )(*manual_axes.align(qg, k, v, q_meta, kv_meta, states, dog, lseg, deltag))
  return dq, dk, dv
