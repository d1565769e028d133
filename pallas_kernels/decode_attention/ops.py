"""Public split-K decode attention op (flash-decoding), forward only.

Decoding needs no gradient, so there is no VJP: differentiating through
``decode_attention`` raises JAX's error for a ``pallas_call`` without a
differentiation rule. Training attention is ``pallas_kernels.block_attention``.

This package imports nothing from ``blockdiff_jax``: the mask is described by plain
arrays (positions, cache lengths) and a static block size.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend
from pallas_kernels.decode_attention import kernel

Array = Any
DecodeBlockSizes = kernel.DecodeBlockSizes

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_interpret() -> bool:
  """Whether the default backend runs the kernel in the Pallas interpreter.

  ``decode_attention(interpret=None)`` does not ask this at trace time: it picks
  per platform when the program is lowered (``backend.call``).
  """
  return backend.resolve_interpret(None)


def _validate(q, k, v, q_positions, kv_positions, kv_lengths) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"decode_attention: q, k, v must be [B, T, H, D], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"decode_attention: k and v shapes differ: {k.shape} vs {v.shape}")
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"decode_attention: k {k.shape} does not match q {q.shape} in batch "
                     "or head_dim")
  if k.shape[2] < 1:
    raise ValueError(f"decode_attention: kv_heads must be >= 1, got k shape {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"decode_attention: heads={h} is not a multiple of "
                     f"kv_heads={k.shape[2]}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"decode_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if q.dtype not in _DTYPES:
    raise ValueError(f"decode_attention: unsupported dtype {q.dtype}")
  if (q_positions is None) != (kv_positions is None):
    raise ValueError("decode_attention: give both q_positions and kv_positions, or neither")
  if q_positions is not None and jnp.shape(q_positions) != q.shape[:2]:
    raise ValueError(f"decode_attention: q_positions shape {jnp.shape(q_positions)} != "
                     f"{q.shape[:2]}")
  if kv_positions is not None and jnp.shape(kv_positions) != k.shape[:2]:
    raise ValueError(f"decode_attention: kv_positions shape {jnp.shape(kv_positions)} != "
                     f"{k.shape[:2]}")
  if kv_lengths is not None and jnp.shape(kv_lengths) != (b,):
    raise ValueError(f"decode_attention: kv_lengths shape {jnp.shape(kv_lengths)} != ({b},)")
  # The kernel reads these as int32: a fractional position (e.g. -0.5, an empty
  # slot to the reference) would silently become another value (0, a used slot).
  for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions),
                  ("kv_lengths", kv_lengths)):
    if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f"decode_attention: {name} must be integer, got "
                       f"{jnp.result_type(x)}")


def _static_block_size(block_size) -> int:
  """``block_size`` as a Python int >= 1, refused by name otherwise.

  The kernel compiles it in (a Python ``> 1`` and ``//``): a jax scalar, even a
  concrete one, failed inside the kernel trace with a TracerBoolConversionError,
  and a fractional one (e.g. from ``/``) cut positions into uneven blocks.
  """
  if isinstance(block_size, jax.core.Tracer):
    raise ValueError("decode_attention: block_size must be a static integer (the kernel "
                     f"compiles it in), got a traced {block_size.aval.str_short()}")
  value = np.asarray(block_size)
  if value.shape or not (np.issubdtype(value.dtype, np.integer)
                         or (np.issubdtype(value.dtype, np.floating)
                             and np.isfinite(value) and value == np.floor(value))):
    raise ValueError(f"decode_attention: block_size must be an integer, got {block_size!r}")
  if value < 1:
    raise ValueError(f"decode_attention: block_size must be >= 1, got {block_size!r}")
  return int(value)


def _pad_to(x: Array, length: int, axis: int, value=0) -> Array:
  pad = length - x.shape[axis]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _row_tile(rows: int, block_sizes: DecodeBlockSizes) -> int:
  return max(16, min(block_sizes.block_m, 1 << (rows - 1).bit_length()))


def split_plan(q_shape: tuple[int, ...], k_shape: tuple[int, ...],
               block_sizes: DecodeBlockSizes = DecodeBlockSizes()) -> kernel.SplitLayout:
  """The split layout ``decode_attention`` uses for q [B, Tq, H, D] and k [B, S, Hkv, D]."""
  b, tq, h, _ = q_shape
  s, hkv = k_shape[1], k_shape[2]
  rows = tq * (h // hkv) if hkv else 0  # No kv head: no program (h // 0 raised).
  row_tiles = -(-rows // _row_tile(rows, block_sizes))
  return kernel.split_layout(s, b * hkv * row_tiles, block_sizes)


def decode_attention(q: Array, k: Array, v: Array, *, q_positions: Array | None = None,
                     kv_positions: Array | None = None, kv_lengths: Array | None = None,
                     block_size: int = 1, scale: float | None = None,
                     block_sizes: DecodeBlockSizes = DecodeBlockSizes(),
                     interpret: bool | None = None) -> Array:
  """Grouped-query attention of a short query block against a long KV cache.

  Cache slot j of batch row b is visible to query i iff ``j < kv_lengths[b]``,
  ``kv_positions[b, j] >= 0`` and
  ``kv_positions[b, j] // block_size <= q_positions[b, i] // block_size``; without
  positions only the length applies. ``block_size=1`` is causal decoding; the
  diffusion block size lets a block see itself bidirectionally (when the caller
  has written the block's own K/V into the cache). Softmax statistics are fp32; a
  query that sees no slot outputs zeros.

  Args:
    q: [B, Tq, H, D] queries (already rotated).
    k: [B, S, Hkv, D] cache keys; H must be a multiple of Hkv.
    v: [B, S, Hkv, D] cache values.
    q_positions: int [B, Tq] positions of the queries.
    kv_positions: int [B, S] positions of the cache slots; negative = empty slot.
    kv_lengths: int [B] slots in use per row (a prefix of S); default S.
    block_size: positions per visibility block (a static integer; a concrete jax
      scalar is read as one).
    scale: logit scale; defaults to D ** -0.5.
    block_sizes: tiles, number of splits and launch options.
    interpret: run the Pallas interpreter; None = on every platform but a GPU,
      chosen when the program is lowered.

  Returns:
    [B, Tq, H, D] in q's dtype. Forward only (no VJP).
  """
  # Nested lists are accepted (as by the reference); their dtype is checked too.
  q_positions, kv_positions, kv_lengths = (
      None if x is None else jnp.asarray(x) for x in (q_positions, kv_positions, kv_lengths))
  _validate(q, k, v, q_positions, kv_positions, kv_lengths)
  block_size = _static_block_size(block_size)
  b, tq, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if 0 in q.shape or 0 in k.shape:
    # No batch row, query, head, slot (every query sees nothing: zeros) or
    # feature: nothing for a kernel to do, and the split layout of zero slots
    # would divide by 0 (an empty batch or head axis failed in the tiling).
    return jnp.zeros(q.shape, q.dtype)
  groups = h // hkv
  scale = backend.static_scale("decode_attention", scale, d)
  if q_positions is None:
    # Length-only masking: every query "is after" every slot.
    q_positions = jnp.full((b, tq), jnp.iinfo(jnp.int32).max, jnp.int32)
    kv_positions = jnp.zeros((b, s), jnp.int32)
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)

  # Rows are (token, group) pairs of one kv head: [B, Hkv, Tq * G, D].
  rows = tq * groups
  block_m = _row_tile(rows, block_sizes)
  rows_pad = -(-rows // block_m) * block_m
  d_pad = max(16, 1 << (d - 1).bit_length())  # Triton tiles are powers of two.
  qr = q.reshape(b, tq, hkv, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
  qr = _pad_to(_pad_to(qr, rows_pad, 2), d_pad, 3)
  q_pos = jnp.repeat(jnp.asarray(q_positions, jnp.int32), groups, axis=1)
  q_pos = _pad_to(q_pos, rows_pad, 1, value=-1)  # Padding rows see nothing.

  layout = split_plan(q.shape, k.shape, block_sizes)
  s_pad = layout.padded_length
  kp = _pad_to(_pad_to(k, s_pad, 1), d_pad, 3)
  vp = _pad_to(_pad_to(v, s_pad, 1), d_pad, 3)
  kv_pos = _pad_to(jnp.asarray(kv_positions, jnp.int32), s_pad, 1, value=-1)
  lengths = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, s)[:, None]

  # interpret=None is decided per platform at lowering, not by the default
  # backend at trace time: a program exported or compiled for a GPU from a CPU
  # host then holds the Triton kernel, not the interpreter.
  o, m, l = backend.call(kernel.split_forward, interpret, qr, q_pos, kp, vp, kv_pos,
                         lengths, layout=layout, scale=scale, block_m=block_m,
                         block_size=block_size, block_sizes=block_sizes)
  out = kernel.combine(o, m, l)[:, :, :rows, :d]  # [B, Hkv, Tq * G, D]
  out = out.reshape(b, hkv, tq, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, tq, h, d)
  return out.astype(q.dtype)
