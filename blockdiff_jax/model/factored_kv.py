"""Rank-r factors of chunked K/V, expanded to dense K/V one layer at a time.

A hierarchical decode cache (``sampling/hierarchical_cache.py``) holds older chunks as
rank-r factors per layer, row, chunk and KV head: K ≈ A B with A [chunk, r] and
B [r, head_dim] (keys factorised with RoPE undone), and the same for V. The model's
attention reads dense K/V. Expanding every layer's factors before the forward, as a
view builder outside the model must, makes a transient as large as the full cache
(``[L, B, n, Hkv, Dh]`` twice), so the memory the cache saves between forwards is
spent again inside each one. ``FactoredKV`` travels into the model instead, is sliced
per layer like the rest of the cache (``nn.scan`` or the layer loop), and each layer's
attention expands only its own slice: the transient is one layer's K/V.

Keys are expanded with RoPE reapplied at their positions (chunk g, offset c is position
``g * chunk + c``); the first ``sinks`` positions are read from exact copies. The view's
metadata lists the expanded positions after the other cached positions
(``HierarchicalKVCache.attention_view``), and ``extend`` appends them in that order.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from blockdiff_jax.model import rope

Array = Any


def rotate(x: Array, positions: Array, inv_freq: tuple[float, ...] | None,
           sign: float) -> Array:
  """RoPE by ``sign * positions`` [B, T] on x [..., B, T, H, D] (sign -1 undoes it)."""
  if inv_freq is None:
    return x
  freq = jnp.asarray(inv_freq, jnp.float32)
  fn = lambda xl: rope.apply_rope(xl, sign * positions, freq)
  for _ in range(x.ndim - 4):  # Leading layer axes.
    fn = jax.vmap(fn)
  return fn(x)


def expand(a: Array, b: Array) -> Array:
  """A [..., B, G, H, c, r] @ B [..., B, G, H, r, D] -> dense [..., B, G*c, H, D] in fp32."""
  x = jnp.einsum("...ghcr,...ghrd->...gchd", a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  *lead, g, c, h, d = x.shape
  return x.reshape(*lead, g * c, h, d)


@flax.struct.dataclass
class FactoredKV:
  """Chunked rank-r K/V factors of one or more layers (leading layer axes optional).

  Attributes:
    key_a, value_a: [..., B, G, Hkv, chunk, r] left factors.
    key_b, value_b: [..., B, G, Hkv, r, Dh] right factors (keys with RoPE undone).
    sink_k, sink_v: [..., B, S, Hkv, Dh] exact K/V of the first S positions (S may be 0).
    inv_freq: RoPE inverse frequencies of the keys (None: keys carry no rotation).
  """

  key_a: Array
  key_b: Array
  value_a: Array
  value_b: Array
  sink_k: Array
  sink_v: Array
  inv_freq: tuple[float, ...] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_positions(self) -> int:
    return self.key_a.shape[-4] * self.key_a.shape[-2]

  def dense(self, dtype=None) -> tuple[Array, Array]:
    """Dense (k, v) [..., B, n, Hkv, Dh] of positions 0..n-1, keys rotated."""
    k, v = expand(self.key_a, self.key_b), expand(self.value_a, self.value_b)
    batch, n = k.shape[-4], k.shape[-3]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    k = rotate(k, pos, self.inv_freq, 1.0)
    s = self.sink_k.shape[-3]
    if s:
      k = k.at[..., :s, :, :].set(self.sink_k.astype(k.dtype))
      v = v.at[..., :s, :, :].set(self.sink_v.astype(v.dtype))
    dtype = dtype or self.sink_k.dtype
    return k.astype(dtype), v.astype(dtype)

  def extend(self, k: Array, v: Array) -> tuple[Array, Array]:
    """(k, v) [B, S, Hkv, Dh] of one layer with this layer's expanded positions after them."""
    bk, bv = self.dense(k.dtype)
    return jnp.concatenate([k, bk], axis=-3), jnp.concatenate([v, bv], axis=-3)
