"""Forward-by-forward traces of the decoders, for notebooks and debugging.

``block_trace`` runs the block decoder one ``denoise_step`` at a time on one prompt and
records which positions each forward filled or (with editing) rewrote, with their
confidence; ``isd_trace`` runs ISD one forward at a time and records the drafts each
forward verified, how many it accepted and what it emitted. Both drive the decoders'
own public steps (the jitted decoders loop the very same functions), so a trace shows
what ``generate`` does; sampled, with the same ``rng`` key, it draws the same tokens.

Both compile like their decoders: the prefill width is bucketed
(``decoder.bucketed_prefill_width``; ISD: ``jit_cache.bucket``, as ``isd.decode_isd``)
and the programs are kept in ``JIT_CACHE``, so tracing many prompts (at a fixed
``width``) compiles one prefill per bucket and one step.
"""

import dataclasses
from typing import Any
import warnings

import jax
import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import isd as isd_lib
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import keys as keys_lib
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib


# The traces' jitted prefill (one per prefill width) and step programs.
JIT_CACHE = jit_cache.JitCache(maxsize=16)


@dataclasses.dataclass(frozen=True)
class _Key:
  """Static arguments of one compiled program: the prefill when ``prefill_len`` is set,
  else the denoising step (which does not depend on the prefill width)."""

  logits_fn: Any
  options: layout.DecodeOptions
  prefill_len: int | None


def _build(key: _Key):
  if key.prefill_len is None:
    return jax.jit(lambda p, s: step_lib.denoise_step(key.logits_fn, p, s, key.options))

  def init(params, tokens, maskable, length, start_block, rng):
    canvas = layout.Canvas(tokens, maskable, length, start_block)
    return state_lib.init_state(key.logits_fn, params, canvas, key.options, key.prefill_len,
                                rng)

  return jax.jit(init)


@dataclasses.dataclass(frozen=True)
class _ISDKey:
  """Static arguments of one compiled ISD program: the prefill when ``prompt_max`` is
  set, else the step (which does not depend on the prefill width)."""

  logits_fn: Any
  options: layout.DecodeOptions
  stride: int
  prompt_max: int | None


def _build_isd(key: _ISDKey):
  fn, opt, n = key.logits_fn, key.options, key.stride
  if key.prompt_max is None:
    return jax.jit(lambda p, s: isd_lib.step(fn, opt, n, p, s))
  return jax.jit(lambda p, t, pl, ln, rng: isd_lib.init(fn, opt, n, key.prompt_max, p, t, pl,
                                                        ln, rng))


def _canvas(tokenizer, prompt: str, options: layout.DecodeOptions, max_new_tokens: int,
            max_len: int, width: int | None = None) -> tuple[np.ndarray, layout.Canvas]:
  """The prompt's ids and its generation canvas; says so when ``max_new_tokens`` is cut.

  Raises ValueError where ``generation.generate`` would (a MASK other than the
  tokenizer's, an empty prompt, MASK tokens in the prompt).

  ``generation.generate`` refuses a request past ``max_len``; a trace is a look at one
  prompt, so it traces the room there is, with a warning naming both numbers (cut
  silently, the shorter trace would read as the model stopping early).
  """
  if options.mask_id != tokenizer.mask_id:
    # As ``generation.generate`` refuses: the canvas's MASK slots would be a plain token
    # to the model, so the trace would show a decode that ``generate`` never runs.
    raise ValueError(f"options.mask_id={options.mask_id} is not the tokenizer's mask_id="
                     f"{tokenizer.mask_id}; build the options with the tokenizer's MASK")
  ids = layout.parse(tokenizer, prompt).ids
  if len(ids) + 1 > max_len:
    raise ValueError(f"prompt: {len(ids)} tokens leave no room in max_len={max_len}")
  room = max_len - len(ids)
  if max_new_tokens > room:
    warnings.warn(f"max_new_tokens={max_new_tokens} with a {len(ids)}-token prompt exceeds "
                  f"max_len={max_len} (generation.generate refuses this request); tracing "
                  f"{room} new tokens", stacklevel=3)
  canvas = layout.generation_canvas([ids], min(max_new_tokens, room), options.block_size,
                                    options.mask_id, max_len, width)
  return ids, canvas


def _text(tokenizer: tokenizers.Tokenizer, ids) -> str:
  return tokenizer.decode(np.asarray(ids, np.int32))


def block_trace(model, params, tokenizer: tokenizers.Tokenizer, prompt: str,
                options: layout.DecodeOptions, max_new_tokens: int, max_len: int,
                max_forwards: int = 10_000, width: int | None = None,
                rng: Any = None) -> dict:
  """The block decoder on one prompt, forward by forward.

  Args:
    model, params, tokenizer: the model (a ``Transformer`` or a logits function).
    prompt: prompt text (specials spelled out).
    options: block decoding options (policy, sub-blocks, editing, token shift).
    max_new_tokens, max_len: limits, as for ``generation.generate``.
    max_forwards: stop after this many forwards (a guard; the decoder always ends).
    width: fixed canvas width, as for ``generation.generate`` (default: the smallest
      that fits); fix it to trace many prompts with one step program.
    rng: sampling key, as for ``generation.generate`` (default key 0): a sampled trace
      with key k draws what ``generate`` draws with key k.

  Returns:
    ``{"fills": [{forward, block, position, token, text, confidence, kind}], "forwards",
    "completion"}``: one entry per write, in the order written (by position within a
    forward); ``kind`` is "fill" (a MASK filled) or "edit" (a written token rewritten by
    editing, so a position may appear again; its last entry holds its final token).
    ``position`` counts from the first generated slot.
  """
  fn = logits_lib.as_logits_fn(model)
  ids, canvas = _canvas(tokenizer, prompt, options, max_new_tokens, max_len, width)
  bk = options.block_size
  prefill_len = decoder.bucketed_prefill_width(
      state_lib.prefill_width(canvas, bk), bk, canvas.tokens.shape[1])
  init = JIT_CACHE.get(_Key(fn, options, prefill_len), _build)
  step = JIT_CACHE.get(_Key(fn, options, None), _build)
  st = init(params, canvas.tokens, canvas.maskable, canvas.length, canvas.start_block,
            keys_lib.normalize(rng, 1))
  start = len(ids)
  fills, forward = [], 0
  while not bool(jax.device_get(st.done)[0]) and forward < max_forwards:
    st, info = step(params, st)
    forward += 1
    info = jax.device_get(info)
    block = int(info.block[0])
    for j in np.flatnonzero(info.accepted[0] | info.edited[0]):
      tok = int(info.tokens[0, j])
      fills.append({"forward": forward, "block": block, "position": int(block * bk + j - start),
                    "token": tok, "text": _text(tokenizer, [tok]),
                    "confidence": float(info.confidence[0, j]),
                    "kind": "edit" if info.edited[0, j] else "fill"})
  gen = np.asarray(jax.device_get(st.tokens))[0, start:int(canvas.length[0])]
  hits = np.flatnonzero(gen == options.eos_id)
  return {"fills": fills, "forwards": forward,
          "completion": _text(tokenizer, gen[:hits[0] if hits.size else len(gen)])}


def isd_trace(model, params, tokenizer: tokenizers.Tokenizer, prompt: str,
              options: layout.DecodeOptions, stride: int, max_new_tokens: int, max_len: int,
              max_forwards: int = 10_000, width: int | None = None,
              rng: Any = None) -> dict:
  """ISD on one prompt, forward by forward (the prefill forward first).

  Args:
    model, params, tokenizer: a token-shifted model (``options.token_shift``).
    prompt: prompt text (specials spelled out).
    options: decoding options (greedy or sampling).
    stride: N: each forward verifies up to N-1 drafts and proposes N-1.
    max_new_tokens, max_len: limits.
    max_forwards: a guard, as for ``block_trace``.
    width: fixed canvas width, as for ``block_trace``.
    rng: sampling key, as for ``block_trace``.

  Returns:
    ``{"forwards": [{forward, verified, accepted, emitted, drafts_next}], "completion"}``:
    per forward the drafts it verified (texts; none on a cold start), how many it
    accepted, the tokens it emitted (accepted drafts and one more) and the drafts it
    proposed for the next forward.
  """
  isd_lib.check_setup(options, stride)
  fn = logits_lib.as_logits_fn(model)
  ids, canvas = _canvas(tokenizer, prompt, options, max_new_tokens, max_len, width)
  slack = np.full((1, 2 * stride), options.mask_id, np.int32)
  tokens = np.concatenate([np.asarray(canvas.tokens, np.int32), slack], axis=1)
  prompt_len = np.array([len(ids)], np.int32)
  length = np.asarray(canvas.length, np.int32)
  # Slots past the prompt are hidden from it, so the bucketed width changes no output.
  prompt_max = jit_cache.bucket(len(ids), canvas.tokens.shape[1])
  init = JIT_CACHE.get(_ISDKey(fn, options, stride, prompt_max), _build_isd)
  step = JIT_CACHE.get(_ISDKey(fn, options, stride, None), _build_isd)
  st = jax.device_get(init(params, tokens, prompt_len, length, keys_lib.normalize(rng, 1)))
  first = [int(st.tokens[0, len(ids)])]
  records = [{"forward": 1, "verified": [], "accepted": 0,
              "emitted": [_text(tokenizer, [t]) for t in first],
              "drafts_next": [_text(tokenizer, [int(t)]) for t in st.drafts[0]]}]
  forward = 1
  while not bool(st.done[0]) and forward < max_forwards:
    pos, warm, drafts = int(st.pos[0]), bool(st.warm[0]), [int(t) for t in st.drafts[0]]
    before = int(st.accepted[0])
    st = jax.device_get(step(params, st))
    forward += 1
    end = min(int(st.pos[0]), int(length[0]) - 1)
    emitted = [int(t) for t in st.tokens[0, pos + 1:end + 1] if t != options.mask_id]
    accepted = int(st.accepted[0]) - before
    records.append({"forward": forward,
                    "verified": [_text(tokenizer, [t]) for t in drafts] if warm else [],
                    "accepted": accepted, "emitted": [_text(tokenizer, [t]) for t in emitted],
                    "drafts_next": [_text(tokenizer, [int(t)]) for t in st.drafts[0]]})
  gen = np.asarray(st.tokens[0, len(ids):int(length[0])])
  hits = np.flatnonzero(gen == options.eos_id)
  return {"forwards": records,
          "completion": _text(tokenizer, gen[:hits[0] if hits.size else len(gen)])}
