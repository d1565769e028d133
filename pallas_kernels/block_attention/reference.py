"""Reference of block attention in plain jnp, written for clarity, not speed.

Independent of the model's XLA path: key/value heads are repeated to the query
heads, the mask is ``masks.dense_mask`` of the metadata, the softmax is
``jax.nn.softmax`` in fp32, and a query that sees no key outputs zeros.
"""

from typing import Any

import jax
import jax.numpy as jnp

from blockdiff_jax import masks

Array = Any


def masked_attention(q: Array, k: Array, v: Array, q_meta: masks.TokenMeta,
                     kv_meta: masks.TokenMeta, spec: masks.MaskSpec = masks.MaskSpec(),
                     scale: float | None = None) -> Array:
  """[B, Tq, H, D] attention of q over k/v ([B, Tk, Hkv, D]) under the metadata mask.

  Metadata fields broadcast to [B, Tq] / [B, Tk] (a field of shape [T] included).
  """
  q_meta, kv_meta = q_meta.broadcast_to(q.shape[:2]), kv_meta.broadcast_to(k.shape[:2])
  h, d = q.shape[2], q.shape[3]
  groups = h // k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  k = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale
  mask = masks.dense_mask(q_meta, kv_meta, spec)[:, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)
