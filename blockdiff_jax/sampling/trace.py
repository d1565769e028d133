"""Forward-by-forward traces of the decoders, for notebooks and debugging.

``block_trace`` runs the block decoder one ``denoise_step`` at a time on one prompt and
records which positions each forward filled or (with editing) rewrote, with their
confidence; ``isd_trace`` runs ISD one forward at a time and records the drafts each
forward verified, how many it accepted and what it emitted. Both drive the decoders'
own public steps (the jitted decoders loop the very same functions), so a trace shows
what ``generate`` does.
"""


import jax
import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import isd as isd_lib
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib


def _canvas(tokenizer, prompt: str, options: layout.DecodeOptions, max_new_tokens: int,
            max_len: int) -> tuple[np.ndarray, layout.Canvas]:
  ids = layout.parse(tokenizer, prompt).ids
  if len(ids) + 1 > max_len:
    raise ValueError(f"prompt: {len(ids)} tokens leave no room in max_len={max_len}")
  canvas = layout.generation_canvas([ids], min(max_new_tokens, max_len - len(ids)),
                                    options.block_size, options.mask_id, max_len)
  return ids, canvas


def _text(tokenizer: tokenizers.Tokenizer, ids) -> str:
  return tokenizer.decode(np.asarray(ids, np.int32))


def block_trace(model, params, tokenizer: tokenizers.Tokenizer, prompt: str,
                options: layout.DecodeOptions, max_new_tokens: int, max_len: int,
                max_forwards: int = 10_000) -> dict:
  """The block decoder on one prompt, forward by forward.

  Args:
    model, params, tokenizer: the model (a ``Transformer`` or a logits function).
    prompt: prompt text (specials spelled out).
    options: block decoding options (policy, sub-blocks, editing, token shift).
    max_new_tokens, max_len: limits, as for ``generation.generate``.
    max_forwards: stop after this many forwards (a guard; the decoder always ends).

  Returns:
    ``{"fills": [{forward, block, position, token, text, confidence, kind}], "forwards",
    "completion"}``: one entry per write, in the order written (by position within a
    forward); ``kind`` is "fill" (a MASK filled) or "edit" (a written token rewritten by
    editing, so a position may appear again; its last entry holds its final token).
    ``position`` counts from the first generated slot.
  """
  fn = logits_lib.as_logits_fn(model)
  ids, canvas = _canvas(tokenizer, prompt, options, max_new_tokens, max_len)
  st = state_lib.init_state(fn, params, canvas, options)
  step = jax.jit(lambda p, s: step_lib.denoise_step(fn, p, s, options))
  start, bk = len(ids), options.block_size
  fills, forward = [], 0
  while not bool(st.done[0]) and forward < max_forwards:
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
  gen = np.asarray(st.tokens[0, start:int(canvas.length[0])])
  hits = np.flatnonzero(gen == options.eos_id)
  return {"fills": fills, "forwards": forward,
          "completion": _text(tokenizer, gen[:hits[0] if hits.size else len(gen)])}


def isd_trace(model, params, tokenizer: tokenizers.Tokenizer, prompt: str,
              options: layout.DecodeOptions, stride: int, max_new_tokens: int, max_len: int,
              max_forwards: int = 10_000) -> dict:
  """ISD on one prompt, forward by forward (the prefill forward first).

  Args:
    model, params, tokenizer: a token-shifted model (``options.token_shift``).
    prompt: prompt text (specials spelled out).
    options: decoding options (greedy or sampling).
    stride: N: each forward verifies up to N-1 drafts and proposes N-1.
    max_new_tokens, max_len: limits.
    max_forwards: a guard, as for ``block_trace``.

  Returns:
    ``{"forwards": [{forward, verified, accepted, emitted, drafts_next}], "completion"}``:
    per forward the drafts it verified (texts; none on a cold start), how many it
    accepted, the tokens it emitted (accepted drafts and one more) and the drafts it
    proposed for the next forward.
  """
  fn = logits_lib.as_logits_fn(model)
  ids, canvas = _canvas(tokenizer, prompt, options, max_new_tokens, max_len)
  slack = np.full((1, 2 * stride), options.mask_id, np.int32)
  tokens = np.concatenate([np.asarray(canvas.tokens, np.int32), slack], axis=1)
  prompt_len = np.array([len(ids)], np.int32)
  length = np.asarray(canvas.length, np.int32)
  init = jax.jit(lambda p, t, pl, ln: isd_lib.init(fn, options, stride, len(ids), p, t, pl,
                                                   ln, jax.random.key(0)))
  step = jax.jit(lambda p, s: isd_lib.step(fn, options, stride, p, s))
  st = jax.device_get(init(params, tokens, prompt_len, length))
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
