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
    """Metadata of the slots a forward in ``mode`` appends to an input with ``meta``."""
    if mode == "first_block":
      return masks.summary_slots_meta(meta.slice(0, self.block_size), self.block_size,
                                      self.num_slots)
    return summary_meta_for(meta, self.layout(mode))


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

