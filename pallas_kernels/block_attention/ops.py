"""Public block-attention op: flash attention with a metadata-derived mask."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from pallas_kernels import backend
from pallas_kernels.block_attention import kernel
from pallas_kernels.block_attention import reference
from pallas_kernels import manual_axes

Array = Any
AttentionBlockSizes = kernel.AttentionBlockSizes


def _validate(q: Array, k: Array, v: Array, q_meta: masks.TokenMeta,
              kv_meta: masks.TokenMeta) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"block_attention: q, k, v must be [B, T, H, D], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"block_attention: k and v shapes differ: {k.shape} vs {v.shape}")
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"block_attention: k {k.shape} does not match q {q.shape} in batch "
                     "or head_dim")
  if k.shape[2] < 1:
    raise ValueError(f"block_attention: kv_heads must be >= 1, got k shape {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"block_attention: heads={h} is not a multiple of "
                     f"kv_heads={k.shape[2]}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"block_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"block_attention: unsupported dtype {q.dtype}")
  for name, meta, want in (("q_meta", q_meta, q.shape[:2]), ("kv_meta", kv_meta, k.shape[:2])):
    # The kernel packs the fields as int32: a fractional segment id (-0.5, padding
    # to the reference) would become 0, a visible token.
    for field in dataclasses.fields(meta):
      dtype = jnp.result_type(getattr(meta, field.name))
      if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
        raise ValueError(f"block_attention: {name}.{field.name} must be integer or bool, "
                         f"got {dtype}")
    shapes = [jnp.shape(x) for x in dataclasses.astuple(meta)]
    try:
      shape = jnp.broadcast_shapes(*shapes)
    except ValueError:
      raise ValueError(f"block_attention: {name} fields do not broadcast: {shapes}") from None
    # Fields that broadcast to [B, T] (one row for the whole batch) are accepted,
    # as by the reference and the model's XLA path (attention_ops.validate_qkv).
    try:
      full = jnp.broadcast_shapes(want, shape)
    except ValueError:
      full = None
    if full != tuple(want):
      raise ValueError(f"block_attention: {name} shape {shape} does not broadcast to {want}")


def block_attention(q: Array, k: Array, v: Array, q_meta: masks.TokenMeta,
                    kv_meta: masks.TokenMeta, *, spec: masks.MaskSpec = masks.MaskSpec(),
                    scale: float | None = None,
                    block_sizes: AttentionBlockSizes = AttentionBlockSizes(),
                    interpret: bool | None = None) -> Array:
  """Grouped-query flash attention whose mask is ``masks.mask_fn`` of the metadata.

  Same semantics as ``reference.masked_attention``: fp32
  softmax statistics, and a query that sees no key outputs zeros. Lengths are
  padded to the tile sizes internally (padded keys get segment id -1). Tiles whose
  mask is false everywhere are skipped without loading K/V.

  Args:
    q: [B, Tq, H, D].
    k: [B, Tk, Hkv, D]; H must be a multiple of Hkv; Tk may differ from Tq
      (decoding against a KV cache).
    v: [B, Tk, Hkv, D].
    q_meta: query metadata, fields broadcastable to [B, Tq].
    kv_meta: key metadata, fields broadcastable to [B, Tk].
    spec: static mask options.
    scale: logit scale; defaults to D ** -0.5.
    block_sizes: kernel tile sizes.
    interpret: run the Pallas interpreter; None = unless the backend is a GPU.

  Returns:
    [B, Tq, H, D] in q's dtype. Differentiable in q, k, v.
  """
  _validate(q, k, v, q_meta, kv_meta)
  # At full rank: the kernel reads one metadata row per batch row, and the
  # reference would misplace the query axis of a field of shape [T].
  q_meta = q_meta.broadcast_to(q.shape[:2])
  kv_meta = kv_meta.broadcast_to(k.shape[:2])
  if 0 in q.shape or 0 in k.shape:
    # Nothing to tile (a query with no key outputs zeros); the plain reference
    # is exact here and differentiable, where the tiling would not start.
    return reference.masked_attention(q, k, v, q_meta, kv_meta, spec, scale)
  scale = backend.static_scale("block_attention", scale, q.shape[-1])
  qm = kernel.pack_meta(q_meta, q.shape[1])
  km = kernel.pack_meta(kv_meta, k.shape[1])
  # Inside shard_map: one set of varying mesh axes, cast outside the custom VJP.
  q, k, v, qm, km = manual_axes.align(q, k, v, qm, km)
  return _attention(q, k, v, qm, km, spec, scale, block_sizes, interpret)


def _tiles(tq: int, tk: int, bs: AttentionBlockSizes) -> tuple[int, ...]:
  """Clamped fwd/bwd tiles and the padded lengths all of them divide."""
  bq = kernel.fit_block(bs.block_q, tq)
  bk = kernel.fit_block(bs.block_k, tk)
  bq_bwd = kernel.fit_block(bs.block_q_bwd, tq)
  bk_bwd = kernel.fit_block(bs.block_k_bwd, tk)
  # Powers of two: the larger tile is a multiple of the smaller one.
  tq_pad = -(-tq // max(bq, bq_bwd)) * max(bq, bq_bwd)
  tk_pad = -(-tk // max(bk, bk_bwd)) * max(bk, bk_bwd)
  return bq, bk, bq_bwd, bk_bwd, tq_pad, tk_pad


def _pad_to(x: Array, length: int, axis: int) -> Array:
  pad = length - x.shape[axis]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _pad_head_dim(x: Array) -> Array:
  # Triton tiles are powers of two; zero columns change neither q·k nor p·v.
  d = x.shape[-1]
  return _pad_to(x, max(16, 1 << (d - 1).bit_length()), axis=3)


def _forward(q, k, v, qm, km, spec, scale, bs, interpret):
  tq, tk, d = q.shape[1], k.shape[1], q.shape[3]
  bq, bk, _, _, tq_pad, tk_pad = _tiles(tq, tk, bs)
  qp = _pad_head_dim(_pad_to(q, tq_pad, 1))
  kp = _pad_head_dim(_pad_to(k, tk_pad, 1))
  vp = _pad_head_dim(_pad_to(v, tk_pad, 1))
  qmp = kernel.pack_meta_pad(qm, tq_pad)
  kmp = kernel.pack_meta_pad(km, tk_pad)
  out, lse = backend.call(kernel.forward, interpret, qp, kp, vp, qmp, kmp, spec=spec,
                          scale=scale, block_q=bq, block_k=bk, block_sizes=bs)
  return out[:, :tq, :, :d], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, qm, km, spec, scale, bs, interpret):
  return _forward(q, k, v, qm, km, spec, scale, bs, interpret)[0]


def _attention_fwd(q, k, v, qm, km, spec, scale, bs, interpret):
  out, lse = _forward(q, k, v, qm, km, spec, scale, bs, interpret)
  return out, (q, k, v, qm, km, out, lse)


def _attention_bwd(spec, scale, bs, interpret, residuals, dout):
  q, k, v, qm, km, out, lse = residuals
  tq, tk, d = q.shape[1], k.shape[1], q.shape[3]
  _, _, bq, bk, tq_pad, tk_pad = _tiles(tq, tk, bs)
  pad_q = lambda x: _pad_head_dim(_pad_to(x, tq_pad, 1))
  pad_k = lambda x: _pad_head_dim(_pad_to(x, tk_pad, 1))
  dq, dk, dv = backend.call(
      kernel.backward, interpret,
      pad_q(q), pad_k(k), pad_k(v), kernel.pack_meta_pad(qm, tq_pad),
      kernel.pack_meta_pad(km, tk_pad), pad_q(out), lse, pad_q(dout.astype(q.dtype)),
      spec=spec, scale=scale, block_q=bq, block_k=bk, block_sizes=bs)
  return dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv[:, :tk, :, :d], None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
