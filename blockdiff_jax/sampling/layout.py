"""Turning prompts and infilling requests into decoder canvases.

Prompt text may name special tokens as ``<|name|>`` (``<|bos|>``, ``<|sep|>``,
``<|fim_prefix|>`` ..., or a token the tokenizer matches whole in text, such as Qwen's
``<|file_sep|>``); an unknown name is an error rather than silently becoming bytes.
``<|mask:N|>`` marks a span of N tokens to generate in place (infilling / local editing).

Infilling layout: the text is laid out at its own positions with MASK slots for the spans
and decoded block by block; every token outside a span is fixed (never written), so the
output outside the spans is byte-identical by construction. A span sees all context to its
left and the context to its right *inside its own block* (the noisy block is
bidirectional; later blocks are not visible to a block-diffusion model). For code
infilling with a long right context, use the fill-in-the-middle prompt (``fim_prompt``):
``<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>``, after which the model
writes the middle and stops with EOS -- the format ``evaluation.infilling`` builds.

``Canvas`` (the decoder's input) and ``DecodeOptions`` (its static options) are defined
here, next to the functions that build them.
"""

import dataclasses
import re
from typing import Sequence

import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import policies

# Anything spelled like a marker (no spaces, 1-64 chars): a known special token,
# ``<|mask:N|>``, or an error naming it (never silently literal text).
_MARKER = re.compile(r"<\|([^\s<>|]{1,64})\|>")
_SPAN = re.compile(r"mask:(\d+)")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Static options of the block decoder.

  Attributes:
    block_size: tokens per diffusion block (the model's training block size).
    mask_id: the MASK token id.
    eos_id: the EOS token id.
    policy: which MASK positions to fill per step.
    sampling: greedy or temperature / top-k / top-p proposals.
    sub_block_size: 0 or block_size = whole-block steps; else the sub-block size.
    max_steps_per_block: step cap per block, split over its sub-blocks as evenly as
      whole steps allow (the later sub-blocks take the remainder), so a block of
      sub-blocks that all have work takes at most this many steps; at least one per
      sub-block. 0 = one step per token (plus ``patience`` with editing), enough for any
      policy.
    edit_threshold: tau_edit of token editing; 0 = editing off. 1 is off too: a token
      is rewritten when its probability exceeds the threshold, which none ever does,
      so the block would only wait ``patience`` idle steps.
    patience: with editing, steps without any change before a block exits.
    stop_at_eos: stop a row after the block in which it generated EOS; without
      editing, as soon as the EOS has no MASK before it.
    token_shift: the model's logits at position i predict token i+1 (a pretrained AR
      model, or one adapted with the shift); False = the logits at i predict token i.
    dual_cache: with sub-blocks, Fast-dLLM v1's dual cache: the block's K/V outside the
      current sub-block (the suffix MASK positions, and the filled sub-blocks) are
      refreshed only on the block's first step instead of each sub-block's first step
      (fewer full-block forwards; approximate).
    kv_hierarchy: None = keep every committed position's K/V; else a hierarchical
      cache (exact recent chunks, rank-r older ones; ``hierarchical_cache``).
    narrow_window: a step runs only the slots it needs: the previous block only when a
      row commits it, the current block only when a row refreshes its buffer, else just
      each row's sub-block (and the slot before it with the shift); ISD runs N slots
      instead of 2N-1 when no running row has drafts to verify. Same outputs; False =
      every step runs the whole commit window (every ISD forward 2N-1 slots), a baseline
      for benchmarks.
  """

  block_size: int
  mask_id: int
  eos_id: int
  policy: policies.Policy = policies.Threshold()
  sampling: policies.Sampling = policies.Sampling()
  sub_block_size: int = 0
  max_steps_per_block: int = 0
  edit_threshold: float = 0.0
  patience: int = 1
  stop_at_eos: bool = True
  token_shift: bool = False
  dual_cache: bool = False
  kv_hierarchy: hierarchical_cache.Hierarchy | None = None
  narrow_window: bool = True

  def __post_init__(self):
    if self.block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    if self.sub_block_size < 0 or (self.sub_block_size and
                                   self.block_size % self.sub_block_size):
      raise ValueError(f"sub_block_size={self.sub_block_size} must divide "
                       f"block_size={self.block_size} (or be 0)")
    if self.max_steps_per_block < 0:
      raise ValueError(f"max_steps_per_block must be >= 0, got {self.max_steps_per_block}")
    if 0 < self.max_steps_per_block < self.num_sub:
      # Every sub-block takes at least one step: a smaller cap cannot be kept.
      raise ValueError(f"max_steps_per_block={self.max_steps_per_block} is fewer than the "
                       f"{self.num_sub} sub-blocks of a block (block_size={self.block_size} "
                       f"/ sub_block_size={self.sub_block_size}), each of which takes at "
                       "least one step; use 0 (no cap) or >= the sub-block count")
    if not 0.0 <= self.edit_threshold <= 1.0:
      raise ValueError(f"edit_threshold must be in [0, 1], got {self.edit_threshold}")
    if self.patience < 1:
      raise ValueError(f"patience must be >= 1, got {self.patience}")

  @property
  def sub(self) -> int:
    return self.sub_block_size or self.block_size

  @property
  def num_sub(self) -> int:
    return self.block_size // self.sub

  @property
  def editing(self) -> bool:
    return 0.0 < self.edit_threshold < 1.0

  @property
  def step_cap(self) -> int:
    """Steps allowed per sub-block (the first ones; see ``sub_step_cap``)."""
    return self.sub_step_cap(0)

  def sub_step_cap(self, sub):
    """Steps allowed in sub-block ``sub`` (an int or an int array).

    ``max_steps_per_block`` is split into whole steps; the last ``max_steps_per_block %
    num_sub`` sub-blocks take one more, so the caps add up to it exactly.
    """
    if self.max_steps_per_block:
      base, extra = divmod(self.max_steps_per_block, self.num_sub)
      return base + (sub >= self.num_sub - extra) * 1
    return self.sub + (self.patience if self.editing else 0)


@dataclasses.dataclass(frozen=True)
class Canvas:
  """Host-side (numpy) input of the decoder (built by the functions below).

  Attributes:
    tokens: [B, S] int32 token slots (MASK where the decoder fills).
    maskable: [B, S] bool, the slots the decoder may write.
    length: [B] int32, slots < length exist.
    start_block: [B] int32, first block that is decoded; earlier blocks are prefilled.
  """

  tokens: np.ndarray
  maskable: np.ndarray
  length: np.ndarray
  start_block: np.ndarray


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A prompt as token ids plus the slots to generate in place.

  Attributes:
    ids: int32 token ids (MASK inside spans).
    maskable: bool, True inside ``<|mask:N|>`` spans.
    pieces: the text split into ``(kind, text)`` with kind "text" (copied verbatim into
      the output), "special" or "span" (regenerated).
  """

  ids: np.ndarray
  maskable: np.ndarray
  pieces: tuple[tuple[str, str], ...]


def parse(tokenizer: tokenizers.Tokenizer, text: str) -> Parsed:
  """Parses prompt text with ``<|special|>`` names and ``<|mask:N|>`` spans."""
  if not isinstance(text, str):
    raise TypeError(f"prompt must be a str, got {type(text).__name__}")
  ids, maskable, pieces, pos = [], [], [], 0
  for m in _MARKER.finditer(text):
    if m.start() > pos:
      _append_text(tokenizer, text[pos:m.start()], ids, maskable, pieces)
    marker, name = m.group(0), m.group(1)
    if name.startswith("mask:"):
      span = _SPAN.fullmatch(name)
      if span is None or int(span.group(1)) < 1:
        raise ValueError(f"malformed span marker {marker!r} in prompt: write <|mask:N|> "
                         f"with N >= 1 tokens")
      n = int(span.group(1))
      ids.append(np.full((n,), tokenizer.mask_id, np.int32))
      maskable.append(np.ones((n,), bool))
      pieces.append(("span", marker))
    else:
      if ":" in name:
        raise ValueError(f"malformed marker {marker!r} in prompt: only <|mask:N|> takes "
                         f"a count")
      ids.append(np.array([_marker_id(tokenizer, marker, name)], np.int32))
      maskable.append(np.zeros((1,), bool))
      pieces.append(("special", marker))
    pos = m.end()
  if pos < len(text):
    _append_text(tokenizer, text[pos:], ids, maskable, pieces)
  if not ids:
    return Parsed(np.zeros((0,), np.int32), np.zeros((0,), bool), ())
  return Parsed(np.concatenate(ids).astype(np.int32), np.concatenate(maskable),
                tuple(pieces))


def _marker_id(tokenizer: tokenizers.Tokenizer, marker: str, name: str) -> int:
  """The id a ``<|name|>`` marker stands for, or a ValueError naming the known ones."""
  specials = tokenizer.special_tokens
  try:
    return tokenizer.token_id(marker if marker in specials else name)
  except KeyError:
    pass
  # A token the tokenizer matches whole in text (an added token that is not special, as
  # Qwen's <|file_sep|> in a tokenizer.json) is that token, as transformers encodes it;
  # a marker spelled out in bytes is a typo.
  got = np.asarray(tokenizer.encode(marker))
  if got.shape == (1,):
    return int(got[0])
  raise ValueError(f"unknown special token {marker!r} in prompt; known: {sorted(specials)} "
                   "and <|mask:N|>")


def _append_text(tokenizer, text, ids, maskable, pieces):
  t = np.asarray(tokenizer.encode(text), np.int32)
  ids.append(t)
  maskable.append(np.zeros(t.shape, bool))
  pieces.append(("text", text))


def spans_to_markers(tokenizer: tokenizers.Tokenizer, text: str,
                     spans: Sequence[tuple[int, int]],
                     lengths: Sequence[int] | None = None) -> str:
  """Rewrites explicit character spans ``[start, end)`` as ``<|mask:N|>`` markers.

  Args:
    tokenizer: gives N = the token count of the span's current text, unless ``lengths``.
    text: the document.
    spans: sorted, non-overlapping character ranges to regenerate.
    lengths: optional token count of each span's replacement.
  """
  out, pos = [], 0
  for i, (a, b) in enumerate(spans):
    if not 0 <= a < b <= len(text) or a < pos:
      raise ValueError(f"span {i} = ({a}, {b}) is empty, out of [0, {len(text)}] or "
                       "overlaps the previous one")
    if lengths is not None and int(lengths[i]) < 1:
      raise ValueError(f"span {i} = ({a}, {b}): replacement length {lengths[i]} must be >= 1 "
                       "(to delete the span, edit the text)")
    n = lengths[i] if lengths is not None else len(tokenizer.encode(text[a:b]))
    out += [text[pos:a], f"<|mask:{max(int(n), 1)}|>"]
    pos = b
  out.append(text[pos:])
  return "".join(out)


def fim_prompt(prefix: str, suffix: str) -> str:
  """The fill-in-the-middle prompt (PSM order) whose continuation is the middle."""
  return (f"{tokenizers.FIM_PREFIX}{prefix}{tokenizers.FIM_SUFFIX}{suffix}"
          f"{tokenizers.FIM_MIDDLE}")


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def check_prompt(ids: np.ndarray, max_new_tokens: int, mask_id: int, max_len: int,
                 name: str = "the prompt") -> None:
  """Raises what ``generation_canvas`` would for this prompt, calling it ``name``.

  Callers that check prompts one by one (to answer the others) name each by its own
  place in their list.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if len(ids) == 0:
    raise ValueError(f"{name} is empty; give at least one token (e.g. <|bos|>)")
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(f"{name} has {len(ids)} tokens; with max_new_tokens="
                     f"{max_new_tokens} it exceeds the context of {max_len} tokens")
  if np.any(np.asarray(ids) == mask_id):
    raise ValueError(f"{name} contains MASK tokens; use infill() for spans")


def check_infill_text(parsed: Parsed, max_len: int, name: str = "the text") -> None:
  """Raises what ``infill_canvas`` would for this text, calling it ``name``."""
  if not parsed.maskable.any():
    raise ValueError(f"{name} has no <|mask:N|> span to fill")
  if len(parsed.ids) > max_len:
    raise ValueError(f"{name} has {len(parsed.ids)} tokens, more than the context of "
                     f"{max_len} tokens")


def generation_canvas(prompts: Sequence[np.ndarray], max_new_tokens: int, block_size: int,
                      mask_id: int, max_len: int, width: int | None = None) -> Canvas:
  """Canvas for continuing each prompt by up to ``max_new_tokens`` tokens.

  Args:
    prompts: token ids per row (specials already resolved; no MASK inside).
    max_new_tokens: generated tokens per row at most.
    block_size: the model's block size.
    mask_id: the MASK id.
    max_len: the model's context (prompt + new tokens must fit).
    width: canvas width (a multiple of block_size); default: the smallest that fits.
      Fix it to get identical shapes (and compiles) across batches.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    check_prompt(p, max_new_tokens, mask_id, max_len, f"prompt {i}")
  need = _round_up(max(len(p) for p in prompts) + max_new_tokens, block_size)
  width = need if width is None else width
  if width % block_size or width < need:
    raise ValueError(f"width={width} must be a multiple of block_size={block_size} "
                     f"and >= {need}")
  n = len(prompts)
  tokens = np.full((n, width), mask_id, np.int32)
  maskable = np.zeros((n, width), bool)
  length = np.zeros((n,), np.int32)
  start = np.zeros((n,), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    maskable[i, len(p):len(p) + max_new_tokens] = True
    length[i] = len(p) + max_new_tokens
    start[i] = len(p) // block_size
  return Canvas(tokens, maskable, length, start)


def infill_canvas(parsed: Sequence[Parsed], block_size: int, max_len: int,
                  width: int | None = None) -> Canvas:
  """Canvas for regenerating the ``<|mask:N|>`` spans of each parsed text in place."""
  if not parsed:
    raise ValueError("no texts given")
  for i, p in enumerate(parsed):
    check_infill_text(p, max_len, f"text {i}")
  need = _round_up(max(len(p.ids) for p in parsed), block_size)
  width = need if width is None else width
  if width % block_size or width < need:
    raise ValueError(f"width={width} must be a multiple of block_size={block_size} "
                     f"and >= {need}")
  n = len(parsed)
  tokens = np.zeros((n, width), np.int32)
  maskable = np.zeros((n, width), bool)
  length = np.zeros((n,), np.int32)
  start = np.zeros((n,), np.int32)
  for i, p in enumerate(parsed):
    tokens[i, :len(p.ids)] = p.ids
    maskable[i, :len(p.ids)] = p.maskable
    length[i] = len(p.ids)
    start[i] = int(np.argmax(p.maskable)) // block_size
  return Canvas(tokens, maskable, length, start)
