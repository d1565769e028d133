"""The decoders' KV cache: committed clean slots plus a buffer for the unfinished block.

Slot ``i`` of a row holds the keys/values of absolute position ``i`` (so no per-row
offsets are needed; writes are per-row dynamic-update-slices). Only slots marked
``valid`` are ever attended to. With ``buffer_size > 0`` the arrays have that many extra
slots at the end, holding the noisy K/V of a row's current (unfinished) block -- the
Fast-dLLM sub-block approximation reads the rest of the block from there. The buffer
sits in the same arrays as the committed slots so that a forward reads the cache
without a copy.

The model reads a cache as ``{"k", "v", "meta"}``; ``attention_view`` builds that dict.
It is the one place that decides what attention sees, so eviction or compression (a
hierarchical cache for long context) can change the layout behind it without touching
the decoders.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from blockdiff_jax import masks

Array = Any


@dataclasses.dataclass(frozen=True)
class KVSpec:
  """Static shape of the K/V a model produces per token.

  Attributes:
    num_layers: layers with a K/V cache.
    num_kv_heads: key/value heads.
    head_dim: width of a head.
    dtype: dtype the cache stores.
    inv_freq: the RoPE inverse frequencies the keys were rotated with (a static tuple),
      or None; a compressing cache factorises keys with the rotation undone.
  """

  num_layers: int
  num_kv_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  inv_freq: tuple[float, ...] | None = None


def row_write(c: Array, update: Array, start: Array) -> Array:
  """Writes update [L, B, T, ...] into c [L, B, W, ...] at slot ``start[b]`` per row.

  Like ``dynamic_update_slice`` it clamps ``start`` to ``W - T``: where a write may run
  past the end, use ``row_put``.
  """
  fn = lambda row, u, s: jax.lax.dynamic_update_slice_in_dim(row, u, s, axis=1)
  return jax.vmap(fn, in_axes=(1, 1, 0), out_axes=1)(c, update, start)


def row_read(c: Array, start: Array, size: int) -> Array:
  """Reads [L, B, size, ...] from c [L, B, W, ...] at slot ``start[b]`` per row."""
  fn = lambda row, st: jax.lax.dynamic_slice_in_dim(row, st, size, axis=1)
  return jax.vmap(fn, in_axes=(1, 0), out_axes=1)(c, start)


def row_put(c: Array, update: Array, start: Array, rows: Array, limit: int,
            batch_axis: int = 1) -> Array:
  """Writes ``update`` at slot ``start[b]`` of the ``rows`` [B] of ``c``, within [0, limit).

  ``row_write`` is a bare ``dynamic_update_slice``, which clamps ``start`` so that the
  whole update fits: a write running past the end lands on the slots before ``start``
  (slot ``i`` then holds the K/V of another position). Here entries for slots outside
  ``[0, limit)`` are dropped, every written slot holds its own position's entry, and rows
  not in ``rows`` keep what they hold (a scatter per row; no read of the old slots).

  Args:
    c: [..., B, W, ...] with the batch axis at ``batch_axis`` and slots right after it.
    update: like ``c`` with T slots.
    start: [B] int32, slot of ``update``'s first entry (may run past ``limit``).
    rows: [B] bool, rows that write.
    limit: slots that may be written (static, <= W): the cache's capacity.
    batch_axis: the batch axis of ``c`` and ``update`` (0 or 1).
  """
  t, width = update.shape[batch_axis + 1], c.shape[batch_axis + 1]

  def one_row(c_row, update_row, start_row, write):
    pos = start_row + jnp.arange(t, dtype=jnp.int32)
    # Slot W is out of bounds, so mode="drop" skips it (a negative index would wrap).
    slot = jnp.where(write & (pos >= 0) & (pos < limit), pos, width)
    at = (slice(None),) * batch_axis + (slot,)
    return c_row.at[at].set(update_row.astype(c_row.dtype), mode="drop")

  # vmap over rows (not one scatter with an explicit row index): the batch stays a
  # parallel dimension, so a batch-sharded cache commits without gathering the update.
  return jax.vmap(one_row, in_axes=(batch_axis, batch_axis, 0, 0),
                  out_axes=batch_axis)(c, update, start, rows)


@flax.struct.dataclass
class KVCache:
  """Per-row K/V of committed (clean) positions and of the unfinished block.

  Attributes:
    k, v: [L, B, capacity + buffer_size, Hkv, Dh].
    valid: [B, capacity] bool, committed slots that attention may read.
    block_ids: [B, capacity] int32, block id of each slot (``position // block_size``
      for the block decoder; the AR decoder gives each generated position its own).
    buffer_start: [B] int32, position of the buffer's first slot.
    capacity: committed slots per row (static).
    block_size: the model's block size (static).
    buffer_size: slots of the unfinished-block buffer; 0 = none (static).
  """

  k: Array
  v: Array
  valid: Array
  block_ids: Array
  buffer_start: Array
  capacity: int = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False)
  buffer_size: int = flax.struct.field(pytree_node=False, default=0)

  @classmethod
  def empty(cls, spec: KVSpec, batch: int, capacity: int, block_size: int,
            buffer_size: int = 0, block_ids: Array | None = None) -> "KVCache":
    """A cache with nothing committed."""
    shape = (spec.num_layers, batch, capacity + buffer_size, spec.num_kv_heads,
             spec.head_dim)
    slot = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
    return cls(k=jnp.zeros(shape, spec.dtype), v=jnp.zeros(shape, spec.dtype),
               valid=jnp.zeros((batch, capacity), bool),
               block_ids=slot // block_size if block_ids is None else block_ids,
               buffer_start=jnp.zeros((batch,), jnp.int32), capacity=capacity,
               block_size=block_size, buffer_size=buffer_size)

  def prefill(self, k: Array, v: Array, valid: Array) -> "KVCache":
    """Writes the K/V [L, B, n, H, D] of positions 0..n-1; ``valid`` [B, n] marks real ones."""
    n = k.shape[2]
    if n > self.capacity:  # Else the K/V spill into the block buffer (or fail obscurely).
      raise ValueError(f"prefill of {n} positions exceeds the cache capacity "
                       f"{self.capacity}")
    return self.replace(k=self.k.at[:, :, :n].set(k.astype(self.k.dtype)),
                        v=self.v.at[:, :, :n].set(v.astype(self.v.dtype)),
                        valid=self.valid.at[:, :n].set(valid))

  def commit(self, k: Array, v: Array, start: Array, rows: Array,
             exists: Array | None = None) -> "KVCache":
    """Commits clean K/V [L, B, T, H, D] at positions ``start[b]..`` of the ``rows`` [B].

    Rows not in ``rows`` keep their slots (they rewrite what they hold). ``exists`` [B,
    capacity] optionally limits which slots become valid (slots past a row's length).
    Positions at or past ``capacity`` are dropped (``row_put``).
    """
    t = k.shape[2]
    put = lambda c, new: row_put(c, new, start, rows, self.capacity)
    slot = jnp.arange(self.capacity, dtype=jnp.int32)[None]
    written = (slot >= start[:, None]) & (slot < (start + t)[:, None]) & rows[:, None]
    if exists is not None:
      written = written & exists
    return self.replace(k=put(self.k, k), v=put(self.v, v), valid=self.valid | written)

  def write_buffer(self, k: Array, v: Array, start: Array, rows: Array) -> "KVCache":
    """Stores the noisy K/V [L, B, buffer_size, H, D] of the block at ``start`` for ``rows``."""
    if not self.buffer_size:
      raise ValueError("this cache has no block buffer (buffer_size=0)")
    if k.shape[2] != self.buffer_size or v.shape[2] != self.buffer_size:
      # jnp.where would broadcast a 1-slot write over the whole buffer.
      raise ValueError(f"write_buffer takes K/V of buffer_size={self.buffer_size} slots, "
                       f"got {k.shape[2]} and {v.shape[2]}")
    at = jnp.full(start.shape, self.capacity, jnp.int32)
    keep = lambda c, new: jnp.where(rows[None, :, None, None, None], new.astype(c.dtype),
                                    c[:, :, self.capacity:])
    return self.replace(k=row_write(self.k, keep(self.k, k), at),
                        v=row_write(self.v, keep(self.v, v), at),
                        buffer_start=jnp.where(rows, start, self.buffer_start))

  def attention_view(self, buffer_valid: Array | None = None) -> dict:
    """The ``{"k", "v", "meta"}`` dict the model attends to.

    Args:
      buffer_valid: [B, buffer_size] bool, buffer slots to read (default: none).
    """
    b = self.valid.shape[0]
    slot = jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32), (b, self.capacity))
    meta = masks.make_meta(slot, self.block_size, masks.CLEAN,
                           jnp.where(self.valid, 0, -1))
    meta = dataclasses.replace(meta, block_ids=self.block_ids)
    if self.buffer_size:
      pos = self.buffer_start[:, None] + jnp.arange(self.buffer_size, dtype=jnp.int32)
      bvalid = (jnp.zeros((b, self.buffer_size), bool) if buffer_valid is None
                else buffer_valid)
      meta = meta.concat(masks.make_meta(pos, self.block_size, masks.NOISY,
                                         jnp.where(bvalid, 0, -1)))
    return {"k": self.k, "v": self.v, "meta": meta}
