"""Bytes of a decoder's KV cache, full or hierarchical, from the model's shapes alone.

Arithmetic only (no arrays), so ``--mode=plan`` can count a 131k-token cache of a 7B
model on a laptop. The layouts are those of ``sampling/kv_cache.py`` (every position's
K/V) and ``sampling/hierarchical_cache.py`` (an exact ring of ``(window + 1) * chunk``
positions and of the first ``sinks`` chunks, plus rank-r factors of every chunk that can
leave the ring); a test checks these counts against the arrays those caches allocate.
``Hierarchy``, the hierarchical cache's static layout, lives here so the plan can check
it without the sampling layer.
"""

import dataclasses
import numbers

import numpy as np


@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """Static layout of a hierarchical cache.

  Attributes:
    window: whole chunks before the one being filled that stay exact (W >= 1).
    chunk: positions per compressed unit (>= the widest commit: a diffusion block,
      ISD's stride, 1 for AR).
    rank: rank r of each chunk's K and V factorisation per layer, row and KV head.
    sinks: chunks at the start of the sequence kept exact for good (StreamingLLM's
      attention sinks: the first tokens draw large attention weights, and compressing
      them moves the output most; on SmolLM2 one exact chunk of 64 cuts the KL 9-24x).
    form: "rank" (older chunks as rank-r factors) or "summary" (older positions are
      dropped: a summary-token model reads them through its summary slots).
  """

  window: int = 2
  chunk: int = 256
  rank: int = 6
  sinks: int = 1
  form: str = "rank"

  def __post_init__(self):
    for field in ("window", "chunk", "rank", "sinks"):
      value = getattr(self, field)
      # A float window or chunk made a float ring and byte counts (1.5 -> 640.0
      # slots) and failed later as an array shape; True passed as 1.
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"kv hierarchy {field} must be an integer, got {value!r}")
    if self.window < 1:
      raise ValueError(f"kv hierarchy window must be >= 1 chunk, got {self.window}")
    if self.chunk < 1:
      raise ValueError(f"kv hierarchy chunk must be >= 1, got {self.chunk}")
    if not 1 <= self.rank <= self.chunk:
      raise ValueError(f"kv hierarchy rank must be in [1, chunk={self.chunk}], "
                       f"got {self.rank}")
    if self.sinks < 0:
      raise ValueError(f"kv hierarchy sinks must be >= 0 chunks, got {self.sinks}")
    if self.form not in ("rank", "summary"):
      raise ValueError(f"kv hierarchy form must be 'rank' or 'summary', got {self.form!r}")

  @property
  def ring(self) -> int:
    """Exact slots per row."""
    return (self.window + 1) * self.chunk

  def bank_chunks(self, capacity: int) -> int:
    """Chunks of the rank-r factor bank of a cache of ``capacity`` positions per row."""
    return bank_chunks(capacity, self.ring, self.chunk)


def bank_chunks(capacity: int, ring: int, chunk: int) -> int:
  """Chunks that can ever leave the exact ring: ``ceil((capacity - ring) / chunk)``.

  Only a chunk whose first position is below ``frontier - ring`` is compressed, and the
  frontier never passes the capacity, so later chunks stay exact in the ring for good.
  """
  return -(-max(capacity - ring, 0) // chunk)


def hierarchy_from_config(s) -> Hierarchy:
  """The hierarchical cache layout of a ``sample`` config section (its ``kv_*`` fields)."""
  try:
    return Hierarchy(window=s.kv_window, chunk=s.kv_chunk, rank=s.kv_rank,
                     sinks=s.get("kv_sinks", 1), form=s.get("kv_form", "rank"))
  except ValueError as e:
    # Hierarchy names its fields "kv hierarchy <field>"; they are sample.kv_<field> here.
    raise ValueError(str(e).replace("kv hierarchy ", "sample.kv_", 1)) from None


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
  the summary form keeps the ring only), or of the full cache the decoders keep instead
  when the ring holds every position."""
  item = np.dtype(dtype).itemsize
  ring = (window + 1) * chunk
  if ring >= capacity:  # Nothing would be compressed: the decoders keep the full cache.
    return full_cache_bytes(num_layers, kv_heads, head_dim, dtype, batch, capacity,
                            buffer_size)
  chunks = bank_chunks(capacity, ring, chunk) if form == "rank" else 0
  sink = min(sinks, chunks) * chunk
  exact = 2 * num_layers * batch * (ring + buffer_size + sink) * kv_heads * head_dim * item
  factors = 2 * num_layers * batch * chunks * kv_heads * rank * (chunk + head_dim) * item
  # ring_pos per slot, frontier and buffer_start per row.
  bookkeeping = batch * (capacity * _POSITION_BYTES + ring * 4 + 2 * _ROW_BYTES)
  return exact + factors + bookkeeping
