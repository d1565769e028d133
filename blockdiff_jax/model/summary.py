"""ChatDLM summary tokens: static options, layouts and the per-block summary for decoding.

Each diffusion block of the clean stream gets S learned summary slots (extra
positions appended after the input, embedded from an [S, d_model] table). A slot
attends to its own clean block and sibling slots; a token attends in full to its
own block and the W clean blocks before it, and to older blocks only through their
slots (``masks.mask_fn`` with ``MaskSpec.window_blocks = W``). The slots carry no
loss: the model strips them before the output head.

Which forwards get slots (``Transformer.__call__(..., summary=...)``):

* ``"bd3"``: the training input ``[x_t ; x_0]`` (2 streams of L); the clean stream
  x_0 gets the slots. ``build.make_apply`` passes it for a summary model, so the
  BD3 / Fast-dLLM objectives, validation and likelihood evaluation need no change.
* ``"clean"``: a clean-only input (a prompt prefill, a block being committed):
  each of its blocks gets slots. ``summarize_block`` wraps this for decoders.
* ``"first_block"``: slots for the input's first block only, which must be clean (the
  block decoder's step: ``[block being committed ; noisy block]``, so a block's slots
  come out of the forward that commits it). The noisy block does not read them (they
  belong to a block inside its window), so its logits are those of ``"none"``.
* ``"none"`` (default of ``apply``): no slots; older blocks are seen through the
  summary K/V already in the cache (a decoding step).

RoPE positions: a block's slots all take the position of the block's last token
(``masks.summary_slots_meta`` says why); they differ by their learned embeddings.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import layers

Array = Any

MODES = ("bd3", "clean", "first_block", "none")


@dataclasses.dataclass(frozen=True)
class SummaryConfig:
  """Static summary-token options (``config.model.summary`` + the block size).

  Attributes:
    num_slots: learned summary slots per block (S >= 1).
    window_blocks: earlier blocks seen in full (W >= 1); older ones via their slots.
    block_size: tokens per diffusion block (``diffusion.block_size``; √n blocks
      give n·√n attention).
  """

  num_slots: int
  window_blocks: int
  block_size: int

  def __post_init__(self):
    layers.require_ints(self, "model.summary", ("num_slots", "window_blocks"))
    layers.require_ints(self, "diffusion", ("block_size",))
    # block_size is diffusion.block_size in the config: no model.summary field holds it.
    for section, name in (("model.summary", "num_slots"), ("model.summary", "window_blocks"),
                          ("diffusion", "block_size")):
      if getattr(self, name) < 1:
        raise ValueError(f"{section}.{name} must be >= 1 with summary tokens on, "
                         f"got {getattr(self, name)}")

  def layout(self, mode: str) -> masks.SummaryLayout | None:
    """The static layout of a forward in ``mode`` (None for ``"none"``)."""
    if mode not in MODES:
      raise ValueError(f"summary must be one of {MODES}, got {mode!r}")
    if mode == "none":
      return None
    return masks.SummaryLayout(streams=2 if mode == "bd3" else 1,
                               block_size=self.block_size, num_slots=self.num_slots)

  def slot_meta(self, meta: masks.TokenMeta, mode: str) -> masks.TokenMeta:
    """Metadata of the slots a forward in ``mode`` appends to an input with ``meta``.

    The slots of token group ``c*B .. c*B+B-1`` take the group's last token's block
    id and position, so the clean tokens must be block-aligned (each group one block).
    Concrete metadata that is not raises a ValueError; traced metadata is not checked.
    """
    if mode == "first_block":
      clean = meta.slice(0, self.block_size)
    else:
      layout = self.layout(mode)
      if layout is None:
        raise ValueError("summary='none' appends no slots")
      clean = meta.slice(meta.shape[-1] - meta.shape[-1] // layout.streams,
                         meta.shape[-1] // layout.streams)
    if clean.shape[-1] % self.block_size == 0:
      _check_block_aligned(clean.block_ids, clean.segment_ids, self.block_size)
    _check_clean(clean, mode)
    if mode == "first_block":
      return masks.summary_slots_meta(clean, self.block_size, self.num_slots)
    return summary_meta_for(meta, layout)


def _check_block_aligned(block_ids: Array, segment_ids: Array, block_size: int) -> None:
  """Raises when concrete ``block_ids`` [..., L] are not one block per group of B tokens.

  Padding (a negative segment id) is left out: a row's tail of pads may carry any
  block id.

  An input starting inside a block (positions 2..9 with B = 4) would otherwise give
  the slots of its group 0 the block id and position of block 1's third token: block 0
  gets no summary and block 1's is rotated to the wrong position, silently (the
  structured attention path refuses such rows, the dense path does not).
  """
  if isinstance(block_ids, jax.core.Tracer) or isinstance(segment_ids, jax.core.Tracer):
    return
  ids = np.asarray(block_ids)
  groups = ids.reshape(ids.shape[:-1] + (-1, block_size))
  real = (np.asarray(segment_ids) >= 0).reshape(groups.shape)
  # Every real token of a group must carry the group's smallest real block id.
  low = np.where(real, groups, np.iinfo(groups.dtype).max).min(-1, keepdims=True)
  bad = np.argwhere(real & (groups != low))
  if bad.size:
    at = tuple(bad[0][:-1])
    first = at[-1] * block_size
    row = ", ".join(map(str, at[:-1]))
    raise ValueError(
        f"summary tokens need block-aligned clean tokens (diffusion.block_size="
        f"{block_size}): tokens {first}..{first + block_size - 1} of row {row} have "
        f"block_ids {groups[at].tolist()}; start the input at a block boundary")


def _check_clean(clean: masks.TokenMeta, mode: str) -> None:
  """Raises when the real tokens the slots summarize are not concrete clean tokens.

  A slot reads only clean, non-summary tokens of its block (``masks.mask_fn``): given
  NOISY metadata (or swapped BD3 streams), the slots would silently summarize nothing
  but each other. Traced metadata is not checked.
  """
  fields = (clean.stream, clean.is_summary, clean.segment_ids)
  if any(isinstance(x, jax.core.Tracer) for x in fields):
    return
  stream, is_summary, segment_ids = np.broadcast_arrays(*map(np.asarray, fields))
  real = segment_ids >= 0
  bad = np.argwhere(real & ((stream != masks.CLEAN) | is_summary))
  if bad.size:
    at = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"summary={mode!r}: the tokens the slots summarize must be clean (stream CLEAN, "
        f"not summary slots), got stream {int(stream[at])} and is_summary "
        f"{bool(is_summary[at])} at index {at} of the "
        f"{'first block' if mode == 'first_block' else 'clean stream'}")


def from_config(summary, block_size: int | None) -> SummaryConfig | None:
  """SummaryConfig from ``config.model.summary`` (None when num_slots is 0 = off)."""
  if summary is None or not summary.num_slots:
    return None
  if block_size is None:
    raise ValueError("model.summary.num_slots > 0 needs the diffusion block size")
  return SummaryConfig(num_slots=summary.num_slots, window_blocks=summary.window_blocks,
                       block_size=block_size)


@flax.struct.dataclass
class BlockSummary:
  """Summary-slot keys/values of committed blocks, for a hierarchical KV cache.

  Attributes:
    k: rotated keys [num_layers, batch, blocks * S, kv_heads, head_dim].
    v: values, same shape.
    meta: TokenMeta [batch, blocks * S] (stream CLEAN, ``is_summary`` True, each
      slot at its block's last position, block id and segment).
  """

  k: Array
  v: Array
  meta: masks.TokenMeta


def summarize_block(model: Any, params: Any, tokens: Array, meta: masks.TokenMeta,
                    cache: dict | None = None,
                    logits_slice: tuple[int, int] | None = None
                    ) -> tuple[Array, tuple[Array, Array], BlockSummary]:
  """The commit pass of finished block(s): their K/V and their summary K/V, computed once.

  Runs ``tokens`` as clean context against ``cache`` with the blocks' summary
  slots appended (``summary="clean"``). The slots read only their own block, but
  that block's hidden states read the cache, so call it with the same cache the
  block's last denoising step saw (full K/V of the W previous blocks and summary
  K/V of older ones); the result equals the training forward's slots.

  Args:
    model: a ``Transformer`` with summary tokens (``cfg.summary`` set).
    params: its params.
    tokens: int32 [B, T], T a multiple of the block size, block-aligned.
    meta: clean metadata [B, T] (``masks.make_meta(..., masks.CLEAN)``).
    cache: optional ``{"k": [L, B, C, Hkv, Dh], "v": ..., "meta": TokenMeta [B, C]}``.
    logits_slice: static ``(start, length)`` of ``tokens`` to compute logits for.

  Returns:
    (logits [B, n, V] fp32, (k, v) of ``tokens`` [L, B, T, Hkv, Dh] each,
    BlockSummary of the T / block_size blocks).
  """
  if model.cfg.summary is None:
    raise ValueError("summarize_block: the model has no summary tokens "
                     "(model.summary.num_slots = 0)")
  logits, aux = model.apply({"params": params}, tokens, meta, cache=cache, return_kv=True,
                            logits_slice=logits_slice, summary="clean")
  k, v = aux["summary_kv"]
  return logits, aux["kv"], BlockSummary(k=k, v=v, meta=aux["summary_meta"])


def summary_meta_for(meta: masks.TokenMeta, layout: masks.SummaryLayout) -> masks.TokenMeta:
  """Slot metadata of an input of ``layout`` (its last stream is the clean one)."""
  total = meta.shape[-1]
  per_block = layout.streams * layout.block_size
  if total % per_block:
    raise ValueError(f"summary layout with {layout.streams} stream(s) of blocks of "
                     f"{layout.block_size}: input length {total} is not a multiple of "
                     f"{per_block}")
  length = total // layout.streams
  clean = meta.slice(total - length, length)
  return masks.summary_slots_meta(clean, layout.block_size, layout.num_slots)

