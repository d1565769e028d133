r"""Text in, text out over the jit decoders: ``generate``, ``infill`` and ``answer``.

Metrics, defined once for every decoder: NFE = forward passes of the decoder while the
row was active. The prefill of full prompt blocks is reported separately
(``prefill_passes``) and is not in NFE, since it produces no token; block commits ride along
with the next block's first forward, so ``commit_passes`` is 0 and TPF needs no commit
caveat. TPF = generated tokens / NFE, where generated tokens count up to and including the
first EOS (never the EOS padding after it). Tokens/s = generated tokens / wall time of the
jitted call (after a warm-up compile when ``warmup``).
"""

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import layout

def _first_eos(row: np.ndarray, eos_id: int) -> int:
  hits = np.flatnonzero(row == eos_id)
  return int(hits[0]) if hits.size else len(row)


def _results(tokenizer, canvas, out, wall_s, block_size, eos_id) -> list[dict]:
  """Per-row results: text, generated tokens, NFE, TPF, steps per block.

  ``eos_id`` is the decoders' stop token (``options.eos_id``), which may differ from the
  tokenizer's (a chat model stopping at its end-of-turn token): the slots after it stay
  MASK, so a cut at the tokenizer's EOS would count them as generated and inflate TPF.
  """
  rows = []
  total = 0
  for i in range(canvas.tokens.shape[0]):
    gen_slots = np.flatnonzero(canvas.maskable[i])
    gen = out["tokens"][i, gen_slots]
    cut = _first_eos(gen, eos_id)
    n_gen = min(cut + 1, len(gen))
    total += n_gen
    nfe = int(out["nfe"][i])
    steps = out.get("steps")
    row_steps = []
    if steps is not None:
      first = int(canvas.start_block[i])
      last = (int(gen_slots[min(n_gen, len(gen_slots)) - 1]) // block_size)
      row_steps = [int(x) for x in steps[i, first:last + 1]]
    rows.append({
        "completion": tokenizer.decode(gen[:cut]),
        "tokens": [int(t) for t in gen[:n_gen]],
        "generated_tokens": n_gen,
        "nfe": nfe,
        "tpf": n_gen / max(nfe, 1),
        "steps_per_block": row_steps,
    })
  for r in rows:
    r["tokens_per_s"] = total / wall_s if wall_s > 0 else float("nan")
  return rows


def _check_mask_id(options: layout.DecodeOptions, tokenizer: tokenizers.Tokenizer) -> None:
  """Refuses options whose MASK is not the tokenizer's.

  The canvas is built with the tokenizer's MASK and the decoders fill ``options.mask_id``
  slots: the block decoder would fill nothing and return the canvas's MASK slots as text.
  """
  if options.mask_id != tokenizer.mask_id:
    raise ValueError(f"options.mask_id={options.mask_id} is not the tokenizer's mask_id="
                     f"{tokenizer.mask_id}; build the options with the tokenizer's MASK")


def check_prompt_list(prompts: Any, name: str = "prompts") -> None:
  """Refuses a bare string where a list of prompts is expected.

  A ``str`` is a sequence of one-character strings: iterated as prompts, each character
  would be decoded as a prompt of its own (9 rows for ``"<|bos|>hi"``), silently.
  """
  if isinstance(prompts, (str, bytes)):
    raise TypeError(f"{name} must be a list of prompt strings, got a single "
                    f"{type(prompts).__name__} {prompts[:40]!r}; pass [{name[:-1]}]")


def _rows_rng(rng: Any, n: int, index: Sequence[int]) -> Any:
  """The key of the prompts at ``index`` among ``n``: one key as given, per-prompt keys
  (``n`` of them, as the decoders take) cut down to those prompts' own."""
  if rng is None:
    return None
  rng = keys.normalize(rng, n)
  return rng if rng.ndim == 0 else rng[np.asarray(index, np.int32)]


def _check_decoder_choice(ar: bool, isd_stride: int) -> None:
  """Refuses ``ar`` with ``isd_stride``: one of the two would be silently ignored."""
  if ar and isd_stride:
    raise ValueError(f"ar=True and isd_stride={isd_stride} ask for two decoders (AR and "
                     "ISD); pass one of them")


def generate(model, params, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str],
             options: layout.DecodeOptions, max_new_tokens: int, max_len: int,
             width: int | None = None, ar: bool = False, rng: Any = None,
             on_block=None, warmup: bool = False,
             isd_stride: int = 0) -> tuple[list[dict], dict]:
  """Continues text prompts (with ``<|special|>`` names) in one batch.

  Args:
    model, params: the model (a ``Transformer`` or a ``logits.LogitsFn``) and its params.
    tokenizer: its tokenizer.
    prompts: prompt strings; e.g. ``"<|bos|>sort: 3 1 2<|sep|>"``.
    options: decoder options (``options_from_config``).
    max_new_tokens: tokens to generate per prompt at most.
    max_len: context limit (prompt + new tokens).
    width: fixed canvas width (same shapes and compiles across calls).
    ar: decode autoregressively (one token per forward) instead.
    rng: sampling key.
    on_block: streaming callback (see ``decoder.decode``); ignored for AR and ISD.
    warmup: run once before timing so tokens/s excludes compilation.
    isd_stride: > 0: introspective strided decoding with this stride (``isd``); not
      with ``ar``.

  Returns:
    (per-row result dicts, batch summary with forwards, tokens/s, mean TPF...).

  Raises:
    TypeError: ``prompts`` is a single string.
    ValueError: both ``ar`` and ``isd_stride`` are set, ``options.mask_id`` is not the
      tokenizer's, or a prompt has mask spans.
  """
  check_prompt_list(prompts)
  _check_decoder_choice(ar, isd_stride)
  _check_mask_id(options, tokenizer)
  ids = []
  for i, p in enumerate(prompts):
    parsed = layout.parse(tokenizer, p)
    if parsed.maskable.any():
      raise ValueError(f"prompt {i} has <|mask:N|> spans; use infill()")
    ids.append(parsed.ids)
  canvas = layout.generation_canvas(ids, max_new_tokens, options.block_size,
                                    tokenizer.mask_id, max_len, width)
  if isd_stride:
    run = lambda stream: isd.decode_isd(model, params, canvas, options, isd_stride, rng)
  elif ar:
    run = lambda stream: ar_lib.decode_ar(model, params, canvas, options, rng)
  else:
    run = lambda stream: decoder.decode(model, params, canvas, options, rng, on_block=stream)
  if warmup:
    # A callback that drops the blocks: the same compiled program (the decoder keys it on
    # whether a callback is given), without streaming every block twice.
    run(None if on_block is None else lambda *_: None)
  t0 = time.perf_counter()
  out = run(on_block)
  wall = time.perf_counter() - t0
  rows = _results(tokenizer, canvas, out, wall, options.block_size, options.eos_id)
  n_gen = sum(r["generated_tokens"] for r in rows)
  nfe = sum(r["nfe"] for r in rows)
  row_nfe = [r["nfe"] for r in rows]
  # ``forwards`` (sequential forwards of the batch) is what wall time follows; the per-row
  # NFE is what TPF counts. With per-row blocks, forwards == max row NFE.
  summary = {"forwards": int(out["forwards"]), "mean_row_nfe": float(np.mean(row_nfe)),
             "max_row_nfe": int(np.max(row_nfe)), "prefill_passes": out["prefill_passes"],
             "commit_passes": out["commit_passes"],
             "narrow_forwards": int(out.get("narrow_forwards", 0)), "generated_tokens": n_gen,
             "wall_s": wall, "tokens_per_s": n_gen / wall,
             "tpf": n_gen / max(nfe, 1),
             "unique_experts": float(out.get("unique_experts", float("nan")))}
  return rows, summary


def infill(model, params, tokenizer: tokenizers.Tokenizer, texts: Sequence[str],
           options: layout.DecodeOptions, max_len: int,
           width: int | None = None, rng: Any = None) -> list[dict]:
  """Regenerates the ``<|mask:N|>`` spans of each text; everything else is kept verbatim.

  ``rng`` is the sampling key (default key 0; only read when ``options.sampling``
  samples). Returns per text ``{"text": the full text with spans filled, "spans": [span
  texts], "nfe": ...}``. Text outside the spans is copied from the input string, never
  re-decoded, so it is byte-identical.
  """
  check_prompt_list(texts, "texts")
  _check_mask_id(options, tokenizer)
  parsed = [layout.parse(tokenizer, t) for t in texts]
  canvas = layout.infill_canvas(parsed, options.block_size, max_len, width)
  opts = dataclasses.replace(options, stop_at_eos=False)
  out = decoder.decode(model, params, canvas, opts, rng)
  results = []
  for i, p in enumerate(parsed):
    pieces, spans, pos = [], [], 0
    for kind, text in p.pieces:
      if kind == "span":
        n = int(text[len("<|mask:"):-2])
        span = tokenizer.decode(out["tokens"][i, pos:pos + n], skip_special=False)
        spans.append(span)
        pieces.append(span)
        pos += n
      else:
        pieces.append(text)
        pos += 1 if kind == "special" else len(tokenizer.encode(text))
    results.append({"text": "".join(pieces), "spans": spans, "nfe": int(out["nfe"][i]),
                    "tokens": out["tokens"][i, :len(p.ids)]})
  return results


def _renumbered(on_block, index: Sequence[int], n: int):
  """``on_block`` seeing the continued prompts' rows at their places among all ``n``.

  The batch holds only the continued prompts; without this, a stream after a refused
  prompt would label prompt 3's blocks "row 2". Rows of other prompts are inactive.
  """
  index = np.asarray(index)

  def stream(block_index, tokens, active):
    block_index, tokens, active = (np.asarray(x) for x in (block_index, tokens, active))
    full_block = np.zeros((n,), block_index.dtype)
    full_tokens = np.zeros((n,) + tokens.shape[1:], tokens.dtype)
    full_active = np.zeros((n,), bool)
    full_block[index], full_tokens[index], full_active[index] = block_index, tokens, active
    on_block(full_block, full_tokens, full_active)

  return stream


def answer(model, params, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str],
           options: layout.DecodeOptions, max_new_tokens: int, max_len: int,
           ar: bool = False, rng: Any = None, on_block=None,
           isd_stride: int = 0) -> tuple[list[dict], dict]:
  """Answers each prompt on its own terms; a bad prompt is reported, not fatal.

  Prompts with ``<|mask:N|>`` spans are infilled (``infill``), the others continued
  (``generate``). A prompt that does not parse or fit gets ``{"prompt", "error"}``
  instead of a result, and the others are answered. ``rng`` (one key, or one key per
  prompt as the decoders take) seeds both kinds (the infilled prompts with a key folded
  from it, so their draws are not the continued ones'); a prompt's own key goes with it
  into whichever batch it joins.
  ``on_block`` streams the continued prompts (see ``decoder.decode``), its rows numbered
  as in ``prompts``.

  Returns:
    (one dict per prompt, in order, each with ``prompt`` and either results or
    ``error``; the summary of the continued prompts, empty when there were none).

  Raises:
    TypeError: ``prompts`` is a single string.
    ValueError: both ``ar`` and ``isd_stride`` are set, or ``options.mask_id`` is not
      the tokenizer's (before any prompt runs).
  """
  check_prompt_list(prompts)
  _check_decoder_choice(ar, isd_stride)
  _check_mask_id(options, tokenizer)  # A batch-wide setting, not one prompt's error.
  rows: list[dict | None] = [None] * len(prompts)
  continue_idx, infill_idx = [], []
  for i, p in enumerate(prompts):
    try:
      parsed = layout.parse(tokenizer, p)
      if parsed.maskable.any():
        if ar or isd_stride or options.token_shift:
          raise ValueError("<|mask:N|> infilling needs the block decoder (a diffusion "
                           "policy on a model without token_shift)")
        layout.check_infill_text(parsed, max_len, f"prompt {i}")
        infill_idx.append(i)
      else:
        layout.check_prompt(parsed.ids, max_new_tokens, tokenizer.mask_id, max_len,
                            f"prompt {i}")
        continue_idx.append(i)
    except (ValueError, TypeError) as e:
      rows[i] = {"prompt": p, "error": str(e)}
  summary = {}
  if continue_idx:
    if on_block is not None and len(continue_idx) < len(prompts):
      on_block = _renumbered(on_block, continue_idx, len(prompts))
    out, summary = generate(model, params, tokenizer, [prompts[i] for i in continue_idx],
                            options, max_new_tokens, max_len, ar=ar,
                            rng=_rows_rng(rng, len(prompts), continue_idx),
                            on_block=on_block, isd_stride=isd_stride)
    for i, r in zip(continue_idx, out):
      rows[i] = {"prompt": prompts[i], **r}
  if infill_idx:
    out = infill(model, params, tokenizer, [prompts[i] for i in infill_idx], options,
                 max_len, rng=None if rng is None else keys.fold(
                     _rows_rng(rng, len(prompts), infill_idx), 1))
    for i, r in zip(infill_idx, out):
      rows[i] = {"prompt": prompts[i], "completion": r["text"], "spans": r["spans"],
                 "nfe": r["nfe"], "tokens": [int(t) for t in r["tokens"]]}
  return rows, summary
