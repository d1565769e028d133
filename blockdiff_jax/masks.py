"""Attention masks as functions of token metadata.

A mask is never an L×L array built in Python: it is a function of the metadata of a
query and a key (position, block id, noisy/clean stream, document segment, summary
flag), like FlexAttention's ``mask_mod``. The XLA attention path evaluates it on the
broadcast [Tq, Tk] grid; the Pallas kernel evaluates the same function per tile and
skips tiles where it is false everywhere.

Rules of the block-diffusion mask (BD3-LM), for a query q and a key k of the same
document segment:

* noisy q, noisy k: same block (bidirectional; causal inside the block when
  ``causal_noisy`` — I-DLM's introspective layout).
* noisy q, clean k: clean blocks strictly before q's block.
* clean q, clean k: clean blocks up to and including q's block (block-causal).
* clean q, noisy k: never.

With ``window_blocks = W > 0`` (ChatDLM summary layout) a regular query sees regular
clean tokens only of the last W blocks before its own, and the summary slots of the
blocks older than that. A summary slot sees the clean tokens and summary slots of its
own block. Keys with a negative segment id (padding, empty cache slots) are never seen.
``summary_slots_meta`` gives the metadata of the slots of a clean stream, and
``SummaryLayout`` names the static full-sequence layout ``[streams... ; slots]`` that
the model's structured attention path exploits.
"""

import dataclasses
import numbers
from typing import Any

import flax.struct
import jax.numpy as jnp

NOISY = 0
CLEAN = 1

Array = Any


def _check_integer(where: str, name: str, value: Any, minimum: int) -> None:
  """Refuses a static size that is not an integer >= ``minimum``.

  A float gave float block ids (and then a silently different window or tiling), 0 an
  XLA integer division by zero (block ids -1, -2, ... with no error), and True passed
  as 1.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")


@flax.struct.dataclass
class TokenMeta:
  """Per-token metadata from which attention masks are derived.

  All fields are int32/bool arrays of the same shape ([batch, length]).

  Attributes:
    positions: RoPE positions (a noisy token and its clean copy share one).
    block_ids: index of the diffusion block the token belongs to.
    stream: ``NOISY`` (0) for tokens being denoised, ``CLEAN`` (1) for context.
    segment_ids: document id; tokens attend only within their segment, and a
      negative id marks padding or an empty cache slot (never attended to).
    is_summary: True for ChatDLM summary slots.
  """

  positions: Array
  block_ids: Array
  stream: Array
  segment_ids: Array
  is_summary: Array

  @property
  def shape(self):
    return self.positions.shape

  def broadcast_to(self, shape: tuple[int, ...]) -> "TokenMeta":
    """Every field broadcast to ``shape`` ([batch, length]): a [T] field or one row for
    the whole batch at full rank, so no axis is taken for another."""
    return TokenMeta(*(jnp.broadcast_to(jnp.asarray(x), shape)
                       for x in dataclasses.astuple(self)))

  def slice(self, start: int, length: int) -> "TokenMeta":
    """Static slice along the last (length) axis."""
    return TokenMeta(*(x[..., start:start + length] for x in dataclasses.astuple(self)))

  def concat(self, other: "TokenMeta") -> "TokenMeta":
    """Concatenates two metadata records along the length axis."""
    return TokenMeta(*(jnp.concatenate([a, b], axis=-1)
                       for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def make_meta(positions, block_size: int, stream, segment_ids=None, is_summary=None) -> TokenMeta:
  """Builds metadata from positions; block ids are ``positions // block_size``.

  Raises:
    ValueError: if ``block_size`` is not an integer >= 1.
  """
  _check_integer("make_meta", "block_size", block_size, 1)
  positions = jnp.asarray(positions, jnp.int32)
  stream = jnp.broadcast_to(jnp.asarray(stream, jnp.int32), positions.shape)
  if segment_ids is None:
    segment_ids = jnp.zeros(positions.shape, jnp.int32)
  if is_summary is None:
    is_summary = jnp.zeros(positions.shape, bool)
  return TokenMeta(positions=positions,
                   block_ids=positions // block_size,
                   stream=stream,
                   segment_ids=jnp.asarray(segment_ids, jnp.int32),
                   is_summary=jnp.asarray(is_summary, bool))


def training_meta(length: int, block_size: int, batch: int = 1, segment_ids=None) -> TokenMeta:
  """Metadata of the vectorized BD3-LM training input ``[x_t ; x_0]`` (length 2L)."""
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  noisy = make_meta(pos, block_size, NOISY, segment_ids)
  clean = make_meta(pos, block_size, CLEAN, segment_ids)
  return noisy.concat(clean)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static options of the block-diffusion mask.

  Attributes:
    causal_noisy: causal (instead of bidirectional) attention inside a noisy block.
    causal_clean: causal attention inside a clean block too; with ``causal_noisy`` the
      clean stream is then exactly a causal LM's, and a noisy block whose earlier tokens
      are all given sees what a causal LM sees.
    window_blocks: 0 = every earlier clean block in full; W > 0 = only the last W
      earlier blocks in full, older ones through their summary slots.
  """

  causal_noisy: bool = False
  causal_clean: bool = False
  window_blocks: int = 0

  def __post_init__(self):
    # 1.5 acted as 1 (block ids are integers), and a string failed in a bare TypeError.
    _check_integer("MaskSpec", "window_blocks", self.window_blocks, 0)


def mask_fn(q: TokenMeta, k: TokenMeta, spec: MaskSpec = MaskSpec()) -> Array:
  """Evaluates the block-diffusion mask on broadcastable query/key metadata.

  Args:
    q: query metadata, e.g. fields of shape [..., Tq, 1].
    k: key metadata, e.g. fields of shape [..., 1, Tk].
    spec: static mask options.

  Returns:
    Boolean array of the broadcast shape; True where q may attend to k.
  """
  same_seg = (q.segment_ids == k.segment_ids) & (k.segment_ids >= 0)
  q_noisy = q.stream == NOISY
  k_noisy = k.stream == NOISY
  bq, bk = q.block_ids, k.block_ids

  noisy_noisy = q_noisy & k_noisy & (bq == bk)
  if spec.causal_noisy:
    noisy_noisy = noisy_noisy & (k.positions <= q.positions)
  # Clean keys a query may see: strictly earlier blocks for noisy queries, up to its
  # own block for clean ones.
  limit = jnp.where(q_noisy, bq - 1, bq)
  clean_key = ~k_noisy & (bk <= limit)
  if spec.causal_clean:
    clean_key = clean_key & ((bk < bq) | (k.positions <= q.positions))
  if spec.window_blocks:
    in_window = bk >= bq - spec.window_blocks
  else:
    in_window = jnp.ones_like(clean_key)
  # Regular queries read regular keys inside the window and summary slots outside it;
  # a summary slot reads only its own block (tokens and sibling slots).
  regular_q = clean_key & jnp.where(k.is_summary, ~in_window, in_window)
  summary_q = ~k_noisy & (bk == bq)
  clean_key = jnp.where(q.is_summary, summary_q, regular_q)
  allowed = noisy_noisy | clean_key
  return allowed & same_seg


def dense_mask(q: TokenMeta, k: TokenMeta, spec: MaskSpec = MaskSpec()) -> Array:
  """Materializes the mask as [batch, Tq, Tk] (the XLA path)."""
  qe = TokenMeta(*(x[..., :, None] for x in dataclasses.astuple(q)))
  ke = TokenMeta(*(x[..., None, :] for x in dataclasses.astuple(k)))
  return mask_fn(qe, ke, spec)


def summary_slots_meta(clean: TokenMeta, block_size: int, num_slots: int) -> TokenMeta:
  """Metadata of the ChatDLM summary slots of a block-aligned clean stream.

  Block ``c`` of ``clean`` (tokens ``c*B .. c*B+B-1``) gets ``num_slots`` slots, laid
  out block-major (``[c0s0, c0s1, ..., c1s0, ...]``). Every slot of a block takes the
  RoPE position, block id and segment of the block's *last* token: a slot is the
  block's running summary, so it sits where the block ends. Relative positions then
  stay meaningful in both directions (the slot reads its block at distances 0..B-1,
  like a causal last token; a later query reads the slot at its distance from the
  block's end) and do not depend on when the slot is computed, so a committed
  block's summary K/V, rotated once, stay valid for every later query. A block whose
  last token is padding (segment -1) gets invisible slots.

  Args:
    clean: clean-stream metadata, fields [batch, L] with ``L % block_size == 0``.
    block_size: tokens per block.
    num_slots: slots per block (S).

  Returns:
    TokenMeta [batch, (L // block_size) * num_slots], stream CLEAN, is_summary True.
  """
  length = clean.shape[-1]
  # A float failed deep in slicing or jnp.repeat, and True passed as 1.
  _check_integer("summary_slots_meta", "block_size", block_size, 1)
  _check_integer("summary_slots_meta", "num_slots", num_slots, 1)
  if length % block_size:
    raise ValueError(f"summary_slots_meta: length {length} is not a multiple of "
                     f"block_size={block_size}")
  last = clean.slice(block_size - 1, length - block_size + 1)
  ends = TokenMeta(*(x[..., ::block_size] for x in dataclasses.astuple(last)))
  rep = lambda x: jnp.repeat(x, num_slots, axis=-1)
  return TokenMeta(positions=rep(ends.positions), block_ids=rep(ends.block_ids),
                   stream=jnp.full_like(rep(ends.stream), CLEAN),
                   segment_ids=rep(ends.segment_ids),
                   is_summary=jnp.ones_like(rep(ends.is_summary), bool))


@dataclasses.dataclass(frozen=True)
class SummaryLayout:
  """Static shape of a full-sequence input with summary slots.

  The input is ``streams`` streams of L tokens each (``[x_t ; x_0]``: 2, the BD3
  training layout; ``[x_0]``: 1), the last of them clean, each with positions
  block-aligned so token ``c*B + i`` of a stream is in its block ``c``; then the
  slots of the clean stream (``summary_slots_meta``): ``L // B * S`` positions.

  Attributes:
    streams: 1 (clean only) or 2 (noisy then clean).
    block_size: tokens per block (B).
    num_slots: summary slots per block (S).
  """

  streams: int
  block_size: int
  num_slots: int

  def __post_init__(self):
    if self.streams not in (1, 2):
      raise ValueError(f"SummaryLayout.streams must be 1 or 2, got {self.streams}")
    for name in ("block_size", "num_slots"):
      value = getattr(self, name)
      # A fractional size would give float block ids and a silently wrong mask.
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"SummaryLayout.{name} must be an integer, got {value!r}")
    if self.block_size < 1 or self.num_slots < 1:
      raise ValueError(f"SummaryLayout: block_size={self.block_size} and "
                       f"num_slots={self.num_slots} must be >= 1")

  def stream_length(self, total: int) -> int:
    """L of a layout whose total length (streams and slots) is ``total``."""
    per_block = self.streams * self.block_size + self.num_slots
    if total % per_block:
      raise ValueError(f"SummaryLayout: length {total} is not streams * L + L // B * S "
                       f"for streams={self.streams}, B={self.block_size}, "
                       f"S={self.num_slots} (each stream's length L must be a multiple "
                       f"of B)")
    return total // per_block * self.block_size

  def num_tokens(self, stream_length: int) -> int:
    """Tokens before the slots (``streams * L``)."""
    return self.streams * stream_length
