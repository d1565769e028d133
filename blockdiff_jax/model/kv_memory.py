"""Bytes of a decoder's KV cache, full or hierarchical, from the model's shapes alone.

Arithmetic only (no arrays), so ``--mode=plan`` can count a 131k-token cache of a 7B
model on a laptop. The layouts are those of ``sampling/kv_cache.py`` (every position's
K/V) and ``sampling/hierarchical_cache.py`` (an exact ring of ``(window + 1) * chunk``
positions and of the first ``sinks`` chunks, plus rank-r factors of every chunk); a test checks these counts against the
arrays those caches allocate.
"""

import numpy as np

# Per position: ``valid`` (bool) and ``block_ids`` (int32); per row: ``buffer_start``.
_POSITION_BYTES = 1 + 4
_ROW_BYTES = 4


def full_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype, batch: int,
                     capacity: int, buffer_size: int = 0) -> int:
  """Bytes of a ``KVCache`` holding ``capacity`` positions per row (+ a block buffer)."""
  item = np.dtype(dtype).itemsize
  kv = 2 * num_layers * batch * (capacity + buffer_size) * kv_heads * head_dim * item
  return kv + batch * (capacity * _POSITION_BYTES + _ROW_BYTES)


def summary_bank_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype, batch: int,
                       capacity: int, block_size: int, num_slots: int) -> int:
  """Bytes of the summary slots a block decoder keeps for a summary-token model."""
  slots = capacity // block_size * num_slots
  kv = 2 * num_layers * batch * slots * kv_heads * head_dim * np.dtype(dtype).itemsize
  return kv + batch * slots * (4 + 4 + 1)  # positions, block ids, valid.


def hierarchical_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype,
                             batch: int, capacity: int, window: int, chunk: int, rank: int,
                             sinks: int = 1, buffer_size: int = 0, form: str = "rank") -> int:
  """Bytes of a ``HierarchicalKVCache`` (exact ring and sink chunks + rank-r factors;
  the summary form keeps the ring only)."""
  item = np.dtype(dtype).itemsize
  ring = (window + 1) * chunk
  chunks = -(-capacity // chunk) if form == "rank" else 0
  sink = min(sinks, chunks) * chunk
  exact = 2 * num_layers * batch * (ring + buffer_size + sink) * kv_heads * head_dim * item
  factors = 2 * num_layers * batch * chunks * kv_heads * rank * (chunk + head_dim) * item
  # ring_pos per slot, frontier and buffer_start per row.
  bookkeeping = batch * (capacity * _POSITION_BYTES + ring * 4 + 2 * _ROW_BYTES)
  return exact + factors + bookkeeping
