"""Masked grouped-query attention in plain jnp: the model's XLA attention path."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from blockdiff_jax import masks

Array = Any


def validate_qkv(op: str, q: Array, k: Array, v: Array, q_meta: masks.TokenMeta | None,
                 kv_meta: masks.TokenMeta | None) -> None:
  """Raises a ValueError naming the mismatch when q/k/v or metadata shapes disagree.

  Args:
    op: the calling op's name, for the message.
    q: [batch, Tq, heads, head_dim].
    k: [batch, Tk, kv_heads, head_dim].
    v: same shape as k.
    q_meta: fields broadcastable to [batch, Tq]; None skips the check.
    kv_meta: fields broadcastable to [batch, Tk]; None skips the check.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{op}: q, k, v must be [batch, T, heads, head_dim], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"{op}: k and v shapes differ: {k.shape} vs {v.shape}")
  if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"{op}: k {k.shape} does not match q {q.shape} in batch or head_dim")
  if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
    raise ValueError(f"{op}: heads={q.shape[2]} is not a multiple of "
                     f"kv_heads={k.shape[2]}")
  for name, meta, want in (("q_meta", q_meta, q.shape[:2]), ("kv_meta", kv_meta, k.shape[:2])):
    if meta is None:
      continue
    shapes = [jnp.shape(x) for x in dataclasses.astuple(meta)]
    try:
      shape = jnp.broadcast_shapes(want, *shapes)
    except ValueError:
      shape = None
    if shape != tuple(want):
      raise ValueError(f"{op}: {name} field shapes {shapes} do not broadcast to {want}")


def masked_attention(q: Array, k: Array, v: Array, q_meta: masks.TokenMeta,
                     kv_meta: masks.TokenMeta, spec: masks.MaskSpec = masks.MaskSpec(),
                     scale: float | None = None) -> Array:
  """Grouped-query attention with a mask derived from token metadata.

  Softmax runs in fp32 whatever the input dtype. A query that sees no key (possible
  for padding) gets a zero output instead of NaN.

  Args:
    q: [batch, Tq, heads, head_dim].
    k: [batch, Tk, kv_heads, head_dim]; heads must be a multiple of kv_heads.
    v: [batch, Tk, kv_heads, head_dim].
    q_meta: metadata of the queries, fields broadcastable to [batch, Tq].
    kv_meta: metadata of the keys, fields broadcastable to [batch, Tk].
    spec: static mask options.
    scale: logit scale; defaults to head_dim ** -0.5.

  Returns:
    [batch, Tq, heads, head_dim] in q's dtype.
  """
  validate_qkv("masked_attention", q, k, v, q_meta, kv_meta)
  b, tq, h, d = q.shape
  # Fields are accepted when they broadcast to [batch, T]; at full rank here, or a
  # field of shape [T] would put the query axis where the mask's batch axis goes
  # (a broadcasting error, or the wrong mask when Tq happens to equal kv_heads).
  q_meta = q_meta.broadcast_to(q.shape[:2])
  kv_meta = kv_meta.broadcast_to(k.shape[:2])
  kv_heads = k.shape[2]
  groups = h // kv_heads
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, tq, kv_heads, groups, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                      preferred_element_type=jnp.float32) * scale
  mask = masks.dense_mask(q_meta, kv_meta, spec)[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  # ``initial``: with no key at all (Tk = 0) there is no maximum; every query then
  # outputs zeros, as with the Pallas kernel and its reference.
  row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, tq, h, d).astype(q.dtype)
