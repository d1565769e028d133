"""The jit-compiled block-diffusion decoder: one ``lax.while_loop`` of ``denoise_step``.

Layout. Every row of the batch is a *canvas* of ``S`` token slots (a multiple of the block
size; see ``layout``) holding, at absolute positions 0.., the prompt, MASK tokens where
text is to be generated, and fixed tokens elsewhere (infilling). Blocks are aligned to
position 0 exactly as in training (``block_ids = positions // block_size``), so a prompt
that ends mid-block is handled the way training saw it: its last, partial block becomes
the first noisy block and its prompt tokens stay there as fixed tokens. All metadata is
per row and a row never attends to another row, so a row's output does not depend on
its batch mates. Slots at or past a row's ``length`` are never attended.

Parts. ``state.init_state`` prefills the blocks before each row's start block in one
block-causal clean pass into a ``kv_cache.KVCache``; ``step.denoise_step`` is one
forward of the batch (each row at its own block, sub-block and step; see ``step``);
``run`` loops it until every row stopped. The model enters only as a logits function
(``logits.from_model``), so a test can drive the decoder with a fake one.

Each row moves through its blocks at its own pace, so the batch takes ``forwards == max
over rows of NFE`` sequential forwards; a finished row is frozen (it still occupies its
batch slot in the forward, which is all it costs).

Streaming: ``on_block`` (a host function) is called with ``jax.debug.callback(...,
ordered=True)`` inside a ``lax.cond``, only on forwards where some row finished a block
(``active`` marks those rows), so there is no host round trip on the other steps. The
compiled function does not depend on which callback is given (it calls a trampoline),
so a new callback does not compile anew.
"""

import dataclasses
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax.model import sharding
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib

P = jax.sharding.PartitionSpec
Array = Any

# Re-exported: the decoder's input types and its parts.
Canvas = layout.Canvas
DecodeOptions = layout.DecodeOptions
DecodeState = state_lib.DecodeState
StepInfo = state_lib.StepInfo
init_state = state_lib.init_state
prefill_width = state_lib.prefill_width
denoise_step = step_lib.denoise_step

JIT_CACHE = jit_cache.JitCache(maxsize=16)


def run(logits_fn, params, state: state_lib.DecodeState, options: layout.DecodeOptions,
        on_block: Callable[..., None] | None = None,
        on_step: Callable[..., None] | None = None) -> state_lib.DecodeState:
  """Runs ``denoise_step`` until every row stopped (traceable; a ``lax.while_loop``).

  Args:
    logits_fn, params: the model (see ``logits``).
    state: from ``init_state``.
    options: decoding options.
    on_block: host callback ``on_block(block_index [B], tokens [B, block], active [B])``
      on forwards where some row finished a block.
    on_step: host callback ``on_step(block_index [B], tokens [B, block])`` after every
      forward.
  """
  def body(st):
    st, info = step_lib.denoise_step(logits_fn, params, st, options)
    if on_step is not None:
      jax.debug.callback(on_step, info.block, info.tokens, ordered=True)
    if on_block is not None:
      jax.lax.cond(jnp.any(info.finished),
                   lambda: jax.debug.callback(on_block, info.block, info.tokens,
                                              info.finished, ordered=True),
                   lambda: None)
    return st

  return jax.lax.while_loop(lambda st: jnp.any(~st.rows.done), body, state)


@dataclasses.dataclass(frozen=True)
class _Key:
  """Static arguments of one compiled decoder."""

  logits_fn: Any
  options: layout.DecodeOptions
  prefill_len: int
  stream_blocks: bool
  stream_steps: bool
  explicit_mesh: bool


# The host callbacks of the decode call in flight; the compiled code calls them through
# the trampolines below, so callbacks are not part of the jit key.
_STREAMS: dict = {"on_block": None, "on_step": None}
_STREAMS_LOCK = threading.Lock()


def _emit_block(*args):
  _STREAMS["on_block"](*args)


def _emit_step(*args):
  _STREAMS["on_step"](*args)


def _build(key: _Key):
  def fn(params, tokens, maskable, length, start_block, rng):
    canvas = layout.Canvas(tokens, maskable, length, start_block)
    st = state_lib.init_state(key.logits_fn, params, canvas, key.options, key.prefill_len,
                              rng)
    st = run(key.logits_fn, params, st, key.options,
             on_block=_emit_block if key.stream_blocks else None,
             on_step=_emit_step if key.stream_steps else None)
    return state_lib.results(st)

  if key.explicit_mesh:
    # Under Explicit mesh axes the loop (per-row dynamic slices of replicated canvases
    # mixed with batch-split model outputs) runs with GSPMD choosing layouts; the small
    # results come back replicated.
    fn = jax.sharding.auto_axes(fn, out_sharding={
        "tokens": P(), "steps": P(), "nfe": P(), "forwards": P(), "edits": P(),
        "unique_experts": P()})
  return jax.jit(fn)


def bucketed_prefill_width(need: int, block_size: int, canvas_width: int) -> int:
  """The prefill width ``decode`` compiles for when the caller fixes none.

  ``need`` (the largest start block's offset) rounded up to a ``jit_cache.bucket`` width,
  then to a block multiple, capped at the canvas width; 0 stays 0 (no prefill pass).
  The padding changes no output: ``init_state`` prefills each row only below its own
  start block (see ``state.prefill_width``).

  Args:
    need: the narrowest usable width, a multiple of ``block_size`` in [0, canvas_width].
    block_size: the decoder's block size.
    canvas_width: slots per canvas row, a multiple of ``block_size``.
  """
  if need % block_size or not 0 <= need <= canvas_width or canvas_width % block_size:
    raise ValueError(f"bucketed_prefill_width: need={need} and canvas_width={canvas_width} "
                     f"must be multiples of block_size={block_size} with need <= "
                     "canvas_width")
  if not need:
    return 0
  width = jit_cache.bucket(need, canvas_width)
  return min(-(-width // block_size) * block_size, canvas_width)


def decode(model, params, canvas: layout.Canvas, options: layout.DecodeOptions,
           rng: Array | None = None, on_block: Callable[..., None] | None = None,
           prefill_width: int | None = None,
           on_step: Callable[..., None] | None = None) -> dict:
  """Runs the block decoder on a canvas; returns numpy results.

  Args:
    model: a ``Transformer`` or a logits function (``logits.LogitsFn``).
    params: its parameters.
    canvas: the host-side input (see ``layout.Canvas``).
    options: static decoding options.
    rng: sampling key, or [B] keys (one per row: a row's draws then do not depend on
      its batch mates); typed or raw ``PRNGKey`` data (``keys.normalize``); default key 0.
    on_block: optional host callback ``on_block(block_index [B], tokens [B, block],
      active [B])`` invoked when decoded blocks finish; each row's blocks arrive once
      each, in order, on calls where that row is ``active``.
    prefill_width: static width of the prefill pass (default: the largest start
      block's offset, bucketed by ``bucketed_prefill_width`` so batches with nearby
      prompt lengths share one program); fix it to share compiles and shapes across
      all batches.
    on_step: optional host callback ``on_step(block_index [B], tokens [B, block])``
      after every denoising step (for visualizing; it syncs with the host per step).

  Returns:
    dict with ``tokens`` [B, S], ``steps`` [B, S // block] (denoising steps each block
    used; 0 for blocks not decoded), ``nfe`` [B] (forwards while the row was active),
    ``forwards`` (forward passes of the batch, prefill excluded), ``prefill_passes``,
    ``commit_passes`` (0: commits ride along with the next block's first step),
    ``edits`` [B] and ``unique_experts`` (mean per MoE layer per forward).
  """
  if options.token_shift and np.asarray(canvas.maskable)[:, :1].any():
    raise ValueError("a token-shifted model predicts token i from the output at i-1, so "
                     "slot 0 has nothing to predict it: a canvas row cannot start with a "
                     "masked slot (put a token such as <|bos|> before the first span)")
  fn = logits_lib.as_logits_fn(model)
  prefill_len = state_lib.prefill_width(canvas, options.block_size, prefill_width)
  if prefill_width is None:
    prefill_len = bucketed_prefill_width(prefill_len, options.block_size,
                                         canvas.tokens.shape[1])
  key = _Key(fn, options, prefill_len, on_block is not None, on_step is not None,
             sharding.explicit_mesh() is not None)
  compiled = JIT_CACHE.get(key, _build)
  args = (params, jnp.asarray(canvas.tokens, jnp.int32), jnp.asarray(canvas.maskable, bool),
          jnp.asarray(canvas.length, jnp.int32), jnp.asarray(canvas.start_block, jnp.int32),
          keys.normalize(rng, canvas.tokens.shape[0]))
  if on_block is None and on_step is None:
    out = jax.device_get(compiled(*args))
  else:
    with _STREAMS_LOCK:
      _STREAMS.update(on_block=on_block, on_step=on_step)
      try:
        out = jax.device_get(compiled(*args))
        jax.effects_barrier()
      finally:
        _STREAMS.update(on_block=None, on_step=None)
  out["prefill_passes"] = int(prefill_len > 0)
  out["commit_passes"] = 0
  return out
