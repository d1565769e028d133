"""Plain-jnp reference of ``decode_attention``: materialises the [B, H, Tq, S] logits."""

from typing import Any

import jax.numpy as jnp

Array = Any


def visibility(q_positions: Array, kv_positions: Array, kv_lengths: Array,
               block_size: int = 1) -> Array:
  """bool [B, Tq, S]: which cache slot each query sees (see ``decode_attention``)."""
  s = kv_positions.shape[1]
  in_use = jnp.arange(s)[None, :] < kv_lengths[:, None]  # [B, S]
  key_ok = in_use & (kv_positions >= 0)
  q_block = jnp.floor_divide(q_positions, block_size)
  k_block = jnp.floor_divide(kv_positions, block_size)
  return key_ok[:, None, :] & (k_block[:, None, :] <= q_block[:, :, None])


def decode_attention(q: Array, k: Array, v: Array, *, q_positions: Array | None = None,
                     kv_positions: Array | None = None, kv_lengths: Array | None = None,
                     block_size: int = 1, scale: float | None = None) -> Array:
  """Same contract as ``ops.decode_attention``, computed densely in fp32."""
  b, tq, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  if (q_positions is None) != (kv_positions is None):
    # As the op: kv_positions alone were replaced by zeros below, so its empty
    # slots (negative positions) silently became visible.
    raise ValueError("decode_attention: give both q_positions and kv_positions, or neither")
  if q_positions is None:
    q_positions = jnp.full((b, tq), jnp.iinfo(jnp.int32).max, jnp.int32)
    kv_positions = jnp.zeros((b, s), jnp.int32)
  mask = visibility(jnp.asarray(q_positions), jnp.asarray(kv_positions),
                    jnp.asarray(kv_lengths), block_size)
  qg = q.astype(jnp.float32).reshape(b, tq, hkv, h // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  # ``initial``: an empty cache (S = 0) has no maximum; its queries output zeros.
  peak = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  p = jnp.exp(logits - peak)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(b, tq, h, d).astype(q.dtype)
