"""Summary-slot K/V of committed blocks, for decoding a model with ChatDLM summary tokens.

A summary model (``model/summary.py``) reads blocks older than its window W only
through their S summary slots, so a decoder must keep those slots' keys/values next to
its KV cache. The block decoder fills the bank as it goes: the prefill runs with
``summary="clean"`` (slots of every prompt block), and each denoising step runs with
``summary="first_block"``, so the forward that commits a block also produces its slots,
computed once. ``extend`` puts the bank in front of the cache's attention view; the
model's mask decides who reads what (a token reads the slots of blocks older than W).

With a full ``KVCache`` the old blocks' K/V are kept but masked out; the hierarchical
cache's summary form (``Hierarchy(form="summary")``) keeps only the recent blocks, so a
summary model decodes exactly as with the full cache at a fraction of the memory.
"""

import dataclasses
from typing import Any

import flax.struct
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.sampling import kv_cache

Array = Any


@flax.struct.dataclass
class SummaryBank:
  """Slots of committed blocks, block-major (block g's slots at ``g*S .. g*S+S-1``).

  Attributes:
    k, v: [L, B, G * S, Hkv, Dh] rotated keys and values of the slots.
    positions: [B, G * S] int32, RoPE position of each slot (its block's last token).
    block_ids: [B, G * S] int32, block id of each slot.
    valid: [B, G * S] bool, slots of committed blocks.
    num_slots: S (static).
  """

  k: Array
  v: Array
  positions: Array
  block_ids: Array
  valid: Array
  num_slots: int = flax.struct.field(pytree_node=False)

  @classmethod
  def empty(cls, spec: kv_cache.KVSpec, batch: int, num_blocks: int,
            num_slots: int) -> "SummaryBank":
    n = num_blocks * num_slots
    shape = (spec.num_layers, batch, n, spec.num_kv_heads, spec.head_dim)
    zeros_i = jnp.zeros((batch, n), jnp.int32)
    return cls(k=jnp.zeros(shape, spec.dtype), v=jnp.zeros(shape, spec.dtype),
               positions=zeros_i, block_ids=zeros_i, valid=jnp.zeros((batch, n), bool),
               num_slots=num_slots)

  def write(self, k: Array, v: Array, meta: masks.TokenMeta, first_block: Array,
            rows: Array) -> "SummaryBank":
    """Stores the slots [L, B, n*S, H, D] of n blocks from block ``first_block[b]`` on.

    ``meta`` is the slots' metadata (``summary_slots_meta``); a slot is valid where its
    segment is (its block's last token was real) and its row is in ``rows``.
    """
    n = k.shape[2]
    if n % self.num_slots:
      raise ValueError(f"summary bank write of {n} slots is not whole blocks of "
                       f"num_slots={self.num_slots}")
    start = first_block * self.num_slots
    # Slots past the bank's blocks are dropped, never shifted onto earlier blocks' slots.
    limit = self.valid.shape[1]
    put5 = lambda c, u: kv_cache.row_put(c, u, start, rows, limit)
    put2 = lambda c, u: kv_cache.row_put(c, u, start, rows, limit, batch_axis=0)
    return self.replace(k=put5(self.k, k), v=put5(self.v, v),
                        positions=put2(self.positions, meta.positions),
                        block_ids=put2(self.block_ids, meta.block_ids),
                        valid=put2(self.valid, meta.segment_ids >= 0))

  def extend(self, view: dict) -> dict:
    """The cache's attention view with the bank's slots in front."""
    meta = masks.make_meta(self.positions, 1, masks.CLEAN, jnp.where(self.valid, 0, -1),
                           is_summary=jnp.ones(self.valid.shape, bool))
    meta = dataclasses.replace(meta, block_ids=self.block_ids)
    return {**view,  # A factored bank, if any, stays after the view's positions.
            "k": jnp.concatenate([self.k.astype(view["k"].dtype), view["k"]], 2),
            "v": jnp.concatenate([self.v.astype(view["v"].dtype), view["v"]], 2),
            "meta": meta.concat(view["meta"])}
