"""Hierarchical KV cache for long context: exact K/V for recent chunks, rank-r for older ones.

ChatDLM keeps full K/V for recent blocks and low-rank summaries of older ones. Here a
row's committed positions are cut into chunks of ``chunk`` tokens. The newest ones
live in a ring of ``(window + 1) * chunk`` slots (``ring[p % R]`` holds position p),
exact. When a position is about to leave the ring, its whole chunk is first
factorised per layer, row and KV head: K_g ≈ A_g B_g with A_g [chunk, r] (left
singular vectors times singular values) and B_g [r, head_dim] (right singular
vectors), the same for V, and the factors go to a bank indexed by chunk. Keys are
factorised with their RoPE rotation undone (``KVSpec.inv_freq``) and rotated back when
read: a chunk's keys are much closer to low rank before the position-dependent
rotation than after it (a test builds rank-2 keys to show it). Memory per
chunk and head drops from ``chunk * head_dim`` to ``r * (chunk + head_dim)`` values;
the ring is fixed, so at long context the cache costs about
``r * (chunk + head_dim) / (chunk * head_dim)`` of the full one. The first ``sinks``
chunks also keep exact copies (attention sinks: the first tokens draw large attention
weights, and their factorisation error moved SmolLM2's outputs most).

Invariant (per row, with frontier P = one past the last committed position): the bank
holds the chunks whose first position is below ``P - R`` (``compressed`` of them; as
P <= capacity, the bank has room for ``ceil((capacity - R) / chunk)`` chunks only),
the ring holds positions ``[P - R, P)``, and attention reads the bank for positions
below ``compressed * chunk`` and the ring from there on, so no position is seen twice
and at least the last ``window`` whole chunks (and the one being filled) are exact.
A commit of at most ``chunk`` positions compresses at most one chunk, which is
entirely in the ring at that moment because ``R >= 2 * chunk``.

The cache has the same interface as ``kv_cache.KVCache`` (``prefill``, ``commit``,
``write_buffer``, ``attention_view``), so the block decoder, AR and ISD use it
unchanged (``layout.DecodeOptions.kv_hierarchy``). Its view hands the bank to the
model in factored form (``model/factored_kv.py``), and each layer's attention expands
its own chunks: the transient is one layer's K/V, and what is held between forwards is
the compressed state, which is what ``cache_bytes`` counts. With
``rank = min(chunk, head_dim)`` the factorisation is exact up to rounding (tests use
that to check decoding equals the full cache); lower ranks are approximate and
``experiments/long_context_cache.py`` measures the KL and passkey cost.

The other form ChatDLM describes, ``form="summary"``, is for a model trained with
summary tokens (``model/summary.py``): it keeps only the ring, and older blocks are read
through their summary slots, which the block decoder keeps beside the cache
(``summary_bank``). Such a model never reads full K/V older than its window, so with a
ring that covers the window this form decodes exactly like the full cache.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import factored_kv
from blockdiff_jax.model import kv_memory
from blockdiff_jax.sampling import kv_cache

Array = Any


# The layout lives with the byte counts (``--mode=plan`` reads it without this module).
Hierarchy = kv_memory.Hierarchy


def _factorise(x: Array, rank: int) -> tuple[Array, Array]:
  """Rank-r factors of x [..., chunk, D] in fp32: (x V_r [..., chunk, r], V_r^T [..., r, D]).

  V_r are the top-r eigenvectors of the Gram matrix x^T x, i.e. x's top right singular
  vectors, so x V_r V_r^T is the best rank-r approximation (Eckart-Young) and x V_r =
  U_r S_r. Through ``eigh`` rather than ``svd``: ``jnp.linalg.svd`` inside the decoders'
  jitted loop hung XLA:CPU on the second call (jax 0.10.2, 2 cores); ``eigh`` did not.
  """
  x = x.astype(jnp.float32)
  gram = jnp.einsum("...cd,...ce->...de", x, x, precision=jax.lax.Precision.HIGHEST)
  _, vecs = jnp.linalg.eigh(gram)  # Ascending eigenvalues.
  r = min(rank, vecs.shape[-1])
  v_r = vecs[..., ::-1][..., :r]  # [..., D, r], largest first.
  a = jnp.einsum("...cd,...dr->...cr", x, v_r, precision=jax.lax.Precision.HIGHEST)
  b = jnp.swapaxes(v_r, -1, -2)
  if r < rank:  # rank > head_dim: pad (the extra factors are zero).
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - r)])
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, rank - r), (0, 0)])
  return a, b


def _to_chunks(x: Array, chunk: int) -> Array:
  """[L, B, G*chunk, H, D] -> [L, B, G, H, chunk, D] (the layout the SVD works on)."""
  l, b, n, h, d = x.shape
  return x.reshape(l, b, n // chunk, chunk, h, d).transpose(0, 1, 2, 4, 3, 5)


@flax.struct.dataclass
class HierarchicalKVCache:
  """Exact ring of recent positions + rank-r factors of older chunks (module docstring).

  Attributes:
    ring_k, ring_v: [L, B, R + buffer_size, Hkv, Dh] exact K/V of positions
      ``[frontier - R, frontier)`` at slot ``p % R``, then the unfinished-block buffer.
    ring_pos: [B, R] int32, the position each ring slot holds (-1 = none).
    bank_ka, bank_va: [L, B, G, Hkv, chunk, r] left factors of each chunk's K and V;
      G = ``hierarchy.bank_chunks(capacity)``, the chunks that can ever leave the ring.
    bank_kb, bank_vb: [L, B, G, Hkv, r, Dh] right factors.
    sink_k, sink_v: [L, B, min(sinks, G) * chunk, Hkv, Dh] exact K/V of the first
      chunks, read instead of their factors once they left the ring.
    valid: [B, capacity] bool, committed positions attention may read.
    block_ids: [B, capacity] int32, block id of each position (as in ``KVCache``).
    frontier: [B] int32, one past the last committed position.
    buffer_start: [B] int32, position of the buffer's first slot.
    capacity, block_size, buffer_size: as in ``KVCache`` (static).
    hierarchy: the static layout.
  """

  ring_k: Array
  ring_v: Array
  ring_pos: Array
  bank_ka: Array
  bank_kb: Array
  bank_va: Array
  bank_vb: Array
  sink_k: Array
  sink_v: Array
  valid: Array
  block_ids: Array
  frontier: Array
  buffer_start: Array
  capacity: int = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False)
  buffer_size: int = flax.struct.field(pytree_node=False)
  hierarchy: Hierarchy = flax.struct.field(pytree_node=False)
  inv_freq: tuple[float, ...] | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def empty(cls, spec: kv_cache.KVSpec, batch: int, capacity: int, block_size: int,
            hierarchy: Hierarchy, buffer_size: int = 0,
            block_ids: Array | None = None) -> "HierarchicalKVCache":
    """A cache with nothing committed."""
    hy = hierarchy
    g = hy.bank_chunks(capacity) if hy.form == "rank" else 0  # Summary form: no bank.
    lb = (spec.num_layers, batch)
    ring = lb + (hy.ring + buffer_size, spec.num_kv_heads, spec.head_dim)
    left = lb + (g, spec.num_kv_heads, hy.chunk, hy.rank)
    right = lb + (g, spec.num_kv_heads, hy.rank, spec.head_dim)
    sink = lb + (min(hy.sinks, g) * hy.chunk, spec.num_kv_heads, spec.head_dim)
    zeros = lambda shape: jnp.zeros(shape, spec.dtype)
    slot = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
    return cls(ring_k=zeros(ring), ring_v=zeros(ring),
               ring_pos=jnp.full((batch, hy.ring), -1, jnp.int32),
               bank_ka=zeros(left), bank_kb=zeros(right), bank_va=zeros(left),
               bank_vb=zeros(right), sink_k=zeros(sink), sink_v=zeros(sink), valid=jnp.zeros((batch, capacity), bool),
               block_ids=slot // block_size if block_ids is None else block_ids,
               frontier=jnp.zeros((batch,), jnp.int32),
               buffer_start=jnp.zeros((batch,), jnp.int32), capacity=capacity,
               block_size=block_size, buffer_size=buffer_size, hierarchy=hy,
               inv_freq=spec.inv_freq)

  @property
  def compressed(self) -> Array:
    """[B] chunks held in the bank: those whose first position is below frontier - R."""
    hy = self.hierarchy
    return (jnp.maximum(self.frontier - hy.ring, 0) + hy.chunk - 1) // hy.chunk

  def _bank_write(self, chunks_k: Array, chunks_v: Array, first: Array,
                  write: Array) -> "HierarchicalKVCache":
    """Factorises chunks [L, B, n, H, chunk, D] and stores them at chunk ``first[b]``+."""
    r = self.hierarchy.rank
    (ka, kb), (va, vb) = _factorise(chunks_k, r), _factorise(chunks_v, r)

    def put(bank, new):
      keep = write.reshape((1,) + write.shape + (1,) * (new.ndim - 3))
      old = kv_cache.row_read(bank, first, new.shape[2])
      return kv_cache.row_write(bank, jnp.where(keep, new.astype(bank.dtype), old), first)

    return self.replace(bank_ka=put(self.bank_ka, ka), bank_kb=put(self.bank_kb, kb),
                        bank_va=put(self.bank_va, va), bank_vb=put(self.bank_vb, vb))

  def prefill(self, k: Array, v: Array, valid: Array) -> "HierarchicalKVCache":
    """Writes the K/V [L, B, n, H, D] of positions 0..n-1; ``valid`` [B, n] is a prefix per row."""
    hy = self.hierarchy
    l, b, n = k.shape[:3]
    if n > self.capacity:  # As KVCache.prefill (else a broadcasting error on ``valid``).
      raise ValueError(f"prefill of {n} positions exceeds the cache capacity "
                       f"{self.capacity}")
    frontier = jnp.max(jnp.where(valid, jnp.arange(n)[None] + 1, 0), axis=1).astype(jnp.int32)
    new = self.replace(valid=self.valid.at[:, :n].set(valid), frontier=frontier)
    if hy.form == "rank":
      new = new._prefill_bank(k, v, valid)
    # Ring: slot j holds the newest position p < frontier with p % R == j.
    j = jnp.arange(hy.ring, dtype=jnp.int32)[None]
    pos = frontier[:, None] - 1 - (frontier[:, None] - 1 - j) % hy.ring
    pos = jnp.where((pos >= 0) & (pos >= frontier[:, None] - hy.ring), pos, -1)
    take = lambda x: jnp.take_along_axis(
        x, jnp.clip(pos, 0, n - 1)[None, :, :, None, None], axis=2).astype(self.ring_k.dtype)
    return new.replace(ring_k=new.ring_k.at[:, :, :hy.ring].set(take(k)),
                       ring_v=new.ring_v.at[:, :, :hy.ring].set(take(v)), ring_pos=pos)

  def _prefill_bank(self, k: Array, v: Array, valid: Array) -> "HierarchicalKVCache":
    """Factorises (and keeps the sinks of) every chunk that starts below frontier - R."""
    hy, new = self.hierarchy, self
    b, n = k.shape[1:3]
    # Bank: every chunk that starts below frontier - R; with frontier <= n that is
    # at most the first ceil((n - R) / chunk), which the bank has room for.
    g = min(-(-n // hy.chunk), self.bank_ka.shape[2])
    if g:
      m = min(n, g * hy.chunk)
      pad = [(0, 0), (0, 0), (0, g * hy.chunk - m), (0, 0), (0, 0)]
      mask = jnp.pad(valid[:, :m], [(0, 0), (0, g * hy.chunk - m)])[None, :, :, None, None]
      cpos = jnp.broadcast_to(jnp.arange(g * hy.chunk, dtype=jnp.int32), (b, g * hy.chunk))
      unrotated = factored_kv.rotate(jnp.pad(k[:, :, :m], pad), cpos, self.inv_freq, -1.0)
      kc = _to_chunks(jnp.where(mask, unrotated, 0), hy.chunk)
      vc = _to_chunks(jnp.where(mask, jnp.pad(v[:, :, :m], pad), 0), hy.chunk)
      write = jnp.arange(g)[None] < new.compressed[:, None]  # [B, g]
      new = new._bank_write(kc, vc, jnp.zeros((b,), jnp.int32), write)
    sn = min(self.sink_k.shape[2], n)
    if sn:
      keep = valid[None, :, :sn, None, None]
      new = new.replace(
          sink_k=new.sink_k.at[:, :, :sn].set(jnp.where(keep, k[:, :, :sn], 0).astype(
              new.sink_k.dtype)),
          sink_v=new.sink_v.at[:, :, :sn].set(jnp.where(keep, v[:, :, :sn], 0).astype(
              new.sink_v.dtype)))
    return new

  def commit(self, k: Array, v: Array, start: Array, rows: Array,
             exists: Array | None = None) -> "HierarchicalKVCache":
    """Commits clean K/V [L, B, T, H, D] at positions ``start[b]..`` (``KVCache.commit``).

    Positions must arrive in order (a commit starts at or below the frontier, with
    T <= chunk); a chunk about to leave the ring is factorised into the bank first.
    """
    hy = self.hierarchy
    t = k.shape[2]
    if t > hy.chunk:
      raise ValueError(f"a commit of {t} positions exceeds the kv hierarchy chunk "
                       f"({hy.chunk}); use chunk >= the decoder's block / stride")
    b = k.shape[1]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
    inside = pos < self.capacity
    write = rows[:, None] & inside
    if exists is not None:
      write = write & jnp.take_along_axis(exists, jnp.clip(pos, 0, self.capacity - 1), 1)
    frontier = jnp.maximum(self.frontier,
                           jnp.max(jnp.where(write, pos + 1, 0), axis=1).astype(jnp.int32))
    new = self
    before, after = self.compressed, self.replace(frontier=frontier).compressed
    leaving = after > before  # At most one chunk per row (T <= chunk).

    def compress(c):
      ring_slot = (before[:, None] * hy.chunk + jnp.arange(hy.chunk)[None]) % hy.ring
      gather = lambda x: jnp.take_along_axis(x, ring_slot[None, :, :, None, None], axis=2)
      cpos = before[:, None] * hy.chunk + jnp.arange(hy.chunk)[None]
      ok = jnp.take_along_axis(c.valid, jnp.clip(cpos, 0, c.capacity - 1), 1)
      ok = (ok & (cpos < c.capacity))[None, :, :, None, None]
      unrotated = factored_kv.rotate(gather(c.ring_k), cpos, c.inv_freq, -1.0)
      kc = _to_chunks(jnp.where(ok, unrotated, 0), hy.chunk)
      vc = _to_chunks(jnp.where(ok, gather(c.ring_v), 0), hy.chunk)
      c = c._bank_write(kc, vc, before, leaving[:, None])
      if c.sink_k.shape[2]:  # A sink chunk also keeps its exact K/V.
        at = jnp.minimum(before * hy.chunk, c.sink_k.shape[2] - hy.chunk)
        to_sink = (leaving & (before < c.sink_k.shape[2] // hy.chunk))[None, :, None, None,
                                                                        None]
        put = lambda store, x: kv_cache.row_write(store, jnp.where(
            to_sink, jnp.where(ok, x, 0), kv_cache.row_read(store, at, hy.chunk)), at)
        c = c.replace(sink_k=put(c.sink_k, gather(c.ring_k)),
                      sink_v=put(c.sink_v, gather(c.ring_v)))
      return c

    if self.bank_ka.shape[2]:  # No bank (summary form, or a ring holding every position).
      new = jax.lax.cond(jnp.any(leaving), compress, lambda c: c, new)
    slot = pos % hy.ring
    bidx = jnp.arange(b)[:, None]
    old_k = jnp.take_along_axis(new.ring_k, slot[None, :, :, None, None], axis=2)
    old_v = jnp.take_along_axis(new.ring_v, slot[None, :, :, None, None], axis=2)
    w5 = write[None, :, :, None, None]
    ring_k = new.ring_k.at[:, bidx, slot].set(jnp.where(w5, k.astype(old_k.dtype), old_k))
    ring_v = new.ring_v.at[:, bidx, slot].set(jnp.where(w5, v.astype(old_v.dtype), old_v))
    ring_pos = new.ring_pos.at[bidx, slot].set(
        jnp.where(write, pos, jnp.take_along_axis(new.ring_pos, slot, 1)))
    # Positions past the capacity are dropped (clipping them would collide with the last).
    valid = new.valid.at[bidx, pos].set(
        jnp.take_along_axis(new.valid, jnp.clip(pos, 0, self.capacity - 1), 1) | write,
        mode="drop")
    return new.replace(ring_k=ring_k, ring_v=ring_v, ring_pos=ring_pos, valid=valid,
                       frontier=frontier)

  def write_buffer(self, k: Array, v: Array, start: Array, rows: Array
                   ) -> "HierarchicalKVCache":
    """Stores the noisy K/V [L, B, buffer_size, H, D] of the block at ``start`` for ``rows``."""
    if not self.buffer_size:
      raise ValueError("this cache has no block buffer (buffer_size=0)")
    if k.shape[2] != self.buffer_size or v.shape[2] != self.buffer_size:
      # jnp.where would broadcast a 1-slot write over the whole buffer.
      raise ValueError(f"write_buffer takes K/V of buffer_size={self.buffer_size} slots, "
                       f"got {k.shape[2]} and {v.shape[2]}")
    at = self.hierarchy.ring
    keep = lambda c, new: jnp.where(rows[None, :, None, None, None], new.astype(c.dtype),
                                    c[:, :, at:])
    return self.replace(ring_k=self.ring_k.at[:, :, at:].set(keep(self.ring_k, k)),
                        ring_v=self.ring_v.at[:, :, at:].set(keep(self.ring_v, v)),
                        buffer_start=jnp.where(rows, start, self.buffer_start))

  def attention_view(self, buffer_valid: Array | None = None) -> dict:
    """The dict the model attends to: ``k``/``v`` [ring | buffer], then the bank.

    The bank goes in factored form (``"factored"``, a ``factored_kv.FactoredKV`` whose
    positions follow the ring and buffer in ``meta``): each layer's attention expands
    only its own chunks, so the forward's transient is one layer's K/V, not the full
    cache that expanding every layer here would build.
    """
    hy = self.hierarchy
    b = self.valid.shape[0]
    cut = (self.compressed * hy.chunk)[:, None]
    rpos = self.ring_pos
    cpos = jnp.clip(rpos, 0, self.capacity - 1)
    ring_ok = ((rpos >= 0) & (rpos >= cut) & jnp.take_along_axis(self.valid, cpos, 1))
    meta = masks.make_meta(jnp.maximum(rpos, 0), self.block_size, masks.CLEAN,
                           jnp.where(ring_ok, 0, -1))
    meta = dataclasses.replace(meta, block_ids=jnp.take_along_axis(self.block_ids, cpos, 1))
    if self.buffer_size:
      pos = self.buffer_start[:, None] + jnp.arange(self.buffer_size, dtype=jnp.int32)
      bvalid = (jnp.zeros((b, self.buffer_size), bool) if buffer_valid is None
                else buffer_valid)
      meta = meta.concat(masks.make_meta(pos, self.block_size, masks.NOISY,
                                         jnp.where(bvalid, 0, -1)))
    view = {"k": self.ring_k, "v": self.ring_v, "meta": meta}
    if hy.form == "rank":
      view["meta"] = meta.concat(self._bank_meta(cut))
      view["factored"] = factored_kv.FactoredKV(
          key_a=self.bank_ka, key_b=self.bank_kb, value_a=self.bank_va,
          value_b=self.bank_vb, sink_k=self.sink_k, sink_v=self.sink_v,
          inv_freq=self.inv_freq)
    return view

  def _bank_meta(self, cut: Array) -> masks.TokenMeta:
    """Metadata of the bank's positions 0..G*chunk-1: those below ``cut`` [B, 1] are read."""
    b, g = self.bank_ka.shape[1:3]
    n = g * self.hierarchy.chunk  # <= capacity - R + chunk - 1 < capacity.
    bank_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    bank_ok = self.valid[:, :n] & (bank_pos < cut)
    meta = masks.make_meta(bank_pos, self.block_size, masks.CLEAN, jnp.where(bank_ok, 0, -1))
    return dataclasses.replace(meta, block_ids=self.block_ids[:, :n])


def dense_view(view: dict) -> dict:
  """An attention view with any factored bank expanded into ``k``/``v`` (all layers).

  What the model computes from ``view``, as one dense cache: for tests and for
  measuring the transient that per-layer expansion avoids.
  """
  if view.get("factored") is None:
    return view
  bk, bv = view["factored"].dense(view["k"].dtype)
  return {"k": jnp.concatenate([view["k"], bk], 2), "v": jnp.concatenate([view["v"], bv], 2),
          "meta": view["meta"]}


def check_one_token_decoder(hierarchy: Hierarchy | None, decoder: str) -> None:
  """AR and ISD keep no summary slots: the summary form is the block decoder's."""
  if hierarchy is not None and hierarchy.form == "summary":
    raise ValueError(f"kv hierarchy form 'summary' works with the block decoder of a "
                     f"summary-token model, not {decoder}; use form 'rank'")


def empty_cache(spec: kv_cache.KVSpec, batch: int, capacity: int, block_size: int,
                buffer_size: int = 0, block_ids: Array | None = None,
                hierarchy: Hierarchy | None = None):
  """A full ``KVCache``, or a ``HierarchicalKVCache`` when ``hierarchy`` is given.

  A hierarchy whose exact ring holds every position (``ring >= capacity``) never
  compresses anything, so it would decode exactly as the full cache while allocating
  more (the ring, the factor bank and the sinks): the full cache is returned then.
  """
  if hierarchy is None or hierarchy.ring >= capacity:
    return kv_cache.KVCache.empty(spec, batch, capacity, block_size, buffer_size, block_ids)
  return HierarchicalKVCache.empty(spec, batch, capacity, block_size, hierarchy,
                                   buffer_size, block_ids)


def cache_bytes(spec: kv_cache.KVSpec, batch: int, capacity: int,
                hierarchy: Hierarchy | None = None, buffer_size: int = 0) -> int:
  """Bytes a decoder's cache holds between forwards (every array of its state)."""
  shapes = jax.eval_shape(lambda: empty_cache(spec, batch, capacity, 1, buffer_size,
                                              None, hierarchy))
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(shapes)))
