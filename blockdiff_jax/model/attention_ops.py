"""Masked grouped-query attention in plain jnp: the model's XLA attention path."""

from typing import Any

import jax
import jax.numpy as jnp

from blockdiff_jax import masks

Array = Any


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
    q_meta: metadata of the queries, fields [batch, Tq].
    kv_meta: metadata of the keys, fields [batch, Tk].
    spec: static mask options.
    scale: logit scale; defaults to head_dim ** -0.5.

  Returns:
    [batch, Tq, heads, head_dim] in q's dtype.
  """
  b, tq, h, d = q.shape
  kv_heads = k.shape[2]
  if h % kv_heads:
    raise ValueError(f"heads={h} is not a multiple of kv_heads={kv_heads}")
  groups = h // kv_heads
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, tq, kv_heads, groups, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                      preferred_element_type=jnp.float32) * scale
  mask = masks.dense_mask(q_meta, kv_meta, spec)[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, tq, h, d).astype(q.dtype)
