"""Loop state of the block decoder and its construction (prefill).

``DecodeState`` is everything one denoising step reads and writes: the canvas, the KV
cache, each row's progress (``RowProgress``) and the counters. ``init_state`` builds it
from a ``layout.Canvas``, prefilling the blocks before each row's start block in one
block-causal clean pass; ``step.denoise_step`` advances it by one forward of the batch.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import summary_bank

Array = Any


@flax.struct.dataclass
class RowProgress:
  """Where each row is; all fields [B].

  Attributes:
    block: the row's current block.
    sub: its current sub-block (0 with whole-block steps).
    step: denoising steps taken in the current sub-block.
    block_steps: denoising steps taken in the current block.
    still: steps since the last change (editing's patience).
    commit: the previous block is committed (clean) on the row's next forward.
    done: the row has stopped.
  """

  block: Array
  sub: Array
  step: Array
  block_steps: Array
  still: Array
  commit: Array
  done: Array


@flax.struct.dataclass
class Counters:
  """What the decoder reports.

  Attributes:
    steps: [B, S // block_size] denoising steps each block used (0 = not decoded).
    nfe: [B] forwards while the row was active.
    edits: [B] tokens rewritten by editing.
    forwards: () forwards of the batch (prefill excluded).
    unique_experts: () sum over forwards of the mean distinct experts per MoE layer.
  """

  steps: Array
  nfe: Array
  edits: Array
  forwards: Array
  unique_experts: Array


@flax.struct.dataclass
class DecodeState:
  """The block decoder's loop state.

  Attributes:
    tokens: [B, S] the canvas being filled.
    maskable: [B, S] bool, slots the decoder may write.
    length: [B] int32, slots < length exist.
    cache: committed K/V (and the unfinished block's buffer with sub-blocks).
    rows: per-row progress.
    counters: NFE, steps and the other reported numbers.
    rng: sampling key (folded with the forward count each step).
    head: token shift only: [B, V] logits of the first token of each row's current
      block, i.e. the output of the last clean token before it (from the prefill, then
      from the forward that commits the previous block); None without token shift.
    summaries: a summary-token model only: the slots of committed blocks
      (``summary_bank.SummaryBank``); None otherwise.
  """

  tokens: Array
  maskable: Array
  length: Array
  cache: kv_cache.KVCache | hierarchical_cache.HierarchicalKVCache
  rows: RowProgress
  counters: Counters
  rng: Array
  head: Array | None = None
  summaries: summary_bank.SummaryBank | None = None

  @property
  def done(self) -> Array:
    return self.rows.done


@flax.struct.dataclass
class StepInfo:
  """What one ``denoise_step`` did, per row.

  Attributes:
    block: [B] the block the step worked on.
    tokens: [B, block_size] that block's tokens after the step.
    accepted: [B, block_size] bool, MASK positions filled by this step.
    confidence: [B, block_size] confidence of the proposed token at every position (at
      an edited position, the probability of the token it was rewritten to).
    active: [B] bool, rows that took a denoising step.
    finished: [B] bool, rows whose block finished with this step.
    edited: [B, block_size] bool, already written positions this step rewrote (editing).
  """

  block: Array
  tokens: Array
  accepted: Array
  confidence: Array
  active: Array
  finished: Array
  edited: Array


def token_meta(positions: Array, block_size: int, stream: int,
               valid: Array) -> masks.TokenMeta:
  """Metadata of decoder tokens; invalid ones get a negative segment (never attended)."""
  return masks.make_meta(positions, block_size, stream, jnp.where(valid, 0, -1))


def prefill_width(canvas: layout.Canvas, block_size: int, width: int | None = None) -> int:
  """Static width of the prefill pass: the largest start block's offset, or ``width``.

  Any block multiple from that offset up to the canvas width decodes the same:
  ``init_state`` treats a prefilled slot as a prompt token (K/V valid in the cache, its
  block's summary slots valid) only below its row's start block and length; the slots
  past it are attended by nothing, so a row still decodes every block from its start
  block on. A width above the offset only costs prefill compute.
  """
  s = canvas.tokens.shape[1]
  if s % block_size:
    raise ValueError(f"canvas width {s} is not a multiple of block_size {block_size}")
  need = int(max(int(x) for x in canvas.start_block)) * block_size
  if width is None:
    return need
  if width < need or width % block_size or width > s:
    raise ValueError(f"prefill_width={width} must be a multiple of {block_size} in "
                     f"[{need}, {s}]")
  return width


def init_state(logits_fn, params, canvas: layout.Canvas, options: layout.DecodeOptions,
               prefill_len: int | None = None, rng: Array | None = None) -> DecodeState:
  """The state before the first denoising step, with the prompt blocks prefilled.

  Args:
    logits_fn: see ``logits.LogitsFn``.
    params: its parameters.
    canvas: the decoder input (numpy or jax arrays).
    options: decoding options.
    prefill_len: static width of the prefill pass (default ``prefill_width(canvas)``,
      which needs a host canvas; under ``jit`` pass it).
    rng: sampling key, or [B] keys (one per row: a row's draws then do not depend on
      its batch mates); typed or raw ``PRNGKey`` data (``keys.normalize``); default key 0.
  """
  if prefill_len is None:
    prefill_len = prefill_width(canvas, options.block_size)
  tokens = jnp.asarray(canvas.tokens, jnp.int32)
  maskable = jnp.asarray(canvas.maskable, bool)
  length = jnp.asarray(canvas.length, jnp.int32)
  start_block = jnp.asarray(canvas.start_block, jnp.int32)
  b, s = tokens.shape
  bk = options.block_size
  buffer = bk if options.num_sub > 1 else 0
  cache = hierarchical_cache.empty_cache(logits_fn.kv_spec, b, s, bk, buffer,
                                         hierarchy=options.kv_hierarchy)
  su = getattr(logits_fn, "summary", None)
  hy = options.kv_hierarchy
  if hy is not None and hy.form == "summary" and su is None:
    raise ValueError("kv hierarchy form 'summary' needs a model with summary tokens "
                     "(model.summary.num_slots > 0); use form 'rank'")
  if hy is not None and hy.form == "summary" and hy.window * hy.chunk < su.window_blocks * bk:
    raise ValueError(f"kv hierarchy window {hy.window} x chunk {hy.chunk} does not cover the "
                     f"model's summary window of {su.window_blocks} blocks of {bk}")
  summaries = None if su is None else summary_bank.SummaryBank.empty(
      logits_fn.kv_spec, b, s // bk, su.num_slots)
  head = None
  if prefill_len:
    slot = jnp.broadcast_to(jnp.arange(prefill_len, dtype=jnp.int32), (b, prefill_len))
    valid = (slot < (start_block * bk)[:, None]) & (slot < length[:, None])
    # Token shift: the first token of each row's start block is predicted by the last
    # prefilled token (rows start at different blocks, so every logit is computed).
    kw = {} if su is None else {"summary": "clean"}  # Slots of every prompt block.
    logits, (k, v), stats = logits_fn(params, tokens[:, :prefill_len],
                                      token_meta(slot, bk, masks.CLEAN, valid), None,
                                      (0, prefill_len) if options.token_shift else (0, 1),
                                      **kw)
    cache = cache.prefill(k, v, valid)
    if su is not None:
      sk, sv = stats["summary_kv"]
      summaries = summaries.write(sk, sv, stats["summary_meta"], jnp.zeros((b,), jnp.int32),
                                  jnp.ones((b,), bool))
    if options.token_shift:
      last = jnp.clip(start_block * bk - 1, 0, prefill_len - 1)
      head = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  if options.token_shift and head is None:
    # Every row starts at block 0: its first token is a prompt token, never predicted.
    # The logits slice is static: closed over, not traced as an argument of eval_shape.
    vocab = jax.eval_shape(lambda p, t, m: logits_fn(p, t, m, None, (0, 1)), params,
                           tokens[:, :1],
                           token_meta(jnp.zeros((b, 1), jnp.int32), bk, masks.CLEAN,
                                      jnp.ones((b, 1), bool)))[0].shape[-1]
    head = jnp.zeros((b, vocab), jnp.float32)
  zeros = jnp.zeros((b,), jnp.int32)
  rows = RowProgress(block=start_block, sub=zeros, step=zeros, block_steps=zeros,
                     still=zeros, commit=jnp.zeros((b,), bool),
                     done=start_block * bk >= length)
  counters = Counters(steps=jnp.zeros((b, s // bk), jnp.int32), nfe=zeros, edits=zeros,
                      forwards=jnp.int32(0), unique_experts=jnp.float32(0.0))
  return DecodeState(tokens=tokens, maskable=maskable, length=length, cache=cache,
                     rows=rows, counters=counters,
                     rng=keys.normalize(rng, b), head=head,
                     summaries=summaries)


def results(state: DecodeState) -> dict:
  """The decoder's outputs (see ``decoder.decode``) from a final state."""
  c = state.counters
  return {"tokens": state.tokens, "steps": c.steps, "nfe": c.nfe, "forwards": c.forwards,
          "edits": c.edits,
          "unique_experts": c.unique_experts / jnp.maximum(c.forwards, 1).astype(jnp.float32)}

