r"""Text-level sampling API, the ``sample`` config section and ``--mode=sample``.

  python -m blockdiff_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=sample --config.sample.prompts="<|bos|>sort: 3 1 2<|sep|>"

Metrics, defined once for every decoder: NFE = forward passes of the decoder while the
row was active. The prefill of full prompt blocks is reported separately
(``prefill_passes``) and is not in NFE, since it produces no token; block commits ride along
with the next block's first forward, so ``commit_passes`` is 0 and TPF needs no commit
caveat. TPF = generated tokens / NFE, where generated tokens count up to and including the
first EOS (never the EOS padding after it). Tokens/s = generated tokens / wall time of the
jitted call (after a warm-up compile when ``warmup``).
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies


def default_sample_config() -> ml_collections.ConfigDict:
  """Defaults of the ``sample`` config section (the lead attaches it as config.sample)."""
  s = ml_collections.ConfigDict()
  s.policy = "threshold"  # threshold | factor | topk | entropy | margin | l2r | ar | isd.
  s.policy_value = 0.9  # tau | f | steps per block | gamma | margin threshold (l2r: unused).
  s.max_new_tokens = 32  # Generated tokens per prompt at most.
  s.isd_stride = 4  # policy=isd (token-shifted models): N; a forward verifies N-1 drafts.
  s.sub_block_size = 0  # 0 = whole-block steps; else sub-block size (divides block_size).
  # With sub-blocks: refresh the block's K/V buffer only at block starts (Fast-dLLM v1
  # dual cache; approximate) instead of at each sub-block's start.
  s.dual_cache = False
  s.temperature = 0.0  # 0 = greedy.
  s.top_k = 0  # Keep the k most likely tokens when sampling; 0 = all.
  s.top_p = 1.0  # Nucleus mass when sampling; 1 = all.
  s.max_steps_per_block = 0  # Step cap per block; 0 = one per token (+ patience).
  s.patience = 1  # With editing: steps without change before a block exits.
  s.edit_threshold = 0.0  # tau_edit of LLaDA 2.1 token editing; 0 = off.
  s.max_len = 0  # Context limit of prompt + new tokens; 0 = data.seq_len.
  s.prompts = "<|bos|>sort: 3 1 4 1 5<|sep|>;<|bos|>add: 12+34<|sep|>"  # ';'-separated.
  s.prompts_file = ""  # One prompt per line; overrides ``prompts`` when set.
  s.seed = 0  # Sampling PRNG seed.
  s.stream = True  # Print each block as it is committed.
  # Also decode every prompt alone by greedy AR (warm, batch 1) and report whether the
  # texts are identical, the TPF and the measured speed-up (sampling/speedup.py).
  s.compare_ar = False
  return s


def options_from_config(s: ml_collections.ConfigDict, block_size: int,
                        tokenizer: tokenizers.Tokenizer,
                        token_shift: bool = False) -> layout.DecodeOptions:
  """DecodeOptions of a ``sample`` config section (validates every field).

  ``token_shift`` is the model's (``config.diffusion.token_shift``), not a decoding choice.
  """
  one_token = s.policy in ("ar", "isd")  # Decoders without a block policy.
  policy = policies.make_policy("threshold" if one_token else s.policy,
                                None if one_token else s.policy_value)
  return layout.DecodeOptions(
      block_size=block_size, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id,
      policy=policy,
      sampling=policies.Sampling(s.temperature, s.top_k, s.top_p),
      sub_block_size=s.sub_block_size, dual_cache=s.get("dual_cache", False),
      max_steps_per_block=s.max_steps_per_block,
      edit_threshold=s.edit_threshold, patience=s.patience, token_shift=token_shift)


def _first_eos(row: np.ndarray, eos_id: int) -> int:
  hits = np.flatnonzero(row == eos_id)
  return int(hits[0]) if hits.size else len(row)


def _results(tokenizer, canvas, out, wall_s, block_size) -> list[dict]:
  """Per-row results: text, generated tokens, NFE, TPF, steps per block."""
  rows = []
  total = 0
  for i in range(canvas.tokens.shape[0]):
    gen_slots = np.flatnonzero(canvas.maskable[i])
    gen = out["tokens"][i, gen_slots]
    cut = _first_eos(gen, tokenizer.eos_id)
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
    isd_stride: > 0: introspective strided decoding with this stride (``isd``).

  Returns:
    (per-row result dicts, batch summary with forwards, tokens/s, mean TPF...).
  """
  ids = []
  for i, p in enumerate(prompts):
    parsed = layout.parse(tokenizer, p)
    if parsed.maskable.any():
      raise ValueError(f"prompt {i} has <|mask:N|> spans; use infill()")
    ids.append(parsed.ids)
  canvas = layout.generation_canvas(ids, max_new_tokens, options.block_size,
                                    tokenizer.mask_id, max_len, width)
  if isd_stride:
    run = lambda: isd.decode_isd(model, params, canvas, options, isd_stride, rng)
  elif ar:
    run = lambda: ar_lib.decode_ar(model, params, canvas, options, rng)
  else:
    run = lambda: decoder.decode(model, params, canvas, options, rng, on_block=on_block)
  if warmup:
    run()
  t0 = time.perf_counter()
  out = run()
  wall = time.perf_counter() - t0
  rows = _results(tokenizer, canvas, out, wall, options.block_size)
  n_gen = sum(r["generated_tokens"] for r in rows)
  nfe = sum(r["nfe"] for r in rows)
  row_nfe = [r["nfe"] for r in rows]
  # ``forwards`` (sequential forwards of the batch) is what wall time follows; the per-row
  # NFE is what TPF counts. With per-row blocks, forwards == max row NFE.
  summary = {"forwards": int(out["forwards"]), "mean_row_nfe": float(np.mean(row_nfe)),
             "max_row_nfe": int(np.max(row_nfe)), "prefill_passes": out["prefill_passes"],
             "commit_passes": out["commit_passes"], "generated_tokens": n_gen,
             "wall_s": wall, "tokens_per_s": n_gen / wall,
             "tpf": n_gen / max(nfe, 1),
             "unique_experts": float(out.get("unique_experts", float("nan")))}
  return rows, summary


def infill(model, params, tokenizer: tokenizers.Tokenizer, texts: Sequence[str],
           options: layout.DecodeOptions, max_len: int,
           width: int | None = None) -> list[dict]:
  """Regenerates the ``<|mask:N|>`` spans of each text; everything else is kept verbatim.

  Returns per text ``{"text": the full text with spans filled, "spans": [span texts],
  "nfe": ...}``. Text outside the spans is copied from the input string, never
  re-decoded, so it is byte-identical.
  """
  parsed = [layout.parse(tokenizer, t) for t in texts]
  canvas = layout.infill_canvas(parsed, options.block_size, max_len, width)
  opts = dataclasses.replace(options, stop_at_eos=False)
  out = decoder.decode(model, params, canvas, opts)
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


def read_prompts(s: ml_collections.ConfigDict) -> list[str]:
  """Prompts from ``prompts_file`` (one per line) or the ';'-separated ``prompts``.

  Raises:
    ValueError: naming the file and byte offset when it is not UTF-8.
  """
  if s.prompts_file:
    with open(s.prompts_file, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw.count(b"\n", 0, e.start) + 1
      raise ValueError(f"prompts file {s.prompts_file} is not UTF-8: byte offset {e.start} "
                       f"(line {line}) holds {raw[e.start:e.end]!r} ({e.reason})") from None
    prompts = [line for line in text.split("\n") if line.strip()]
  else:
    prompts = [p for p in s.prompts.split(";") if p]
  if not prompts:
    raise ValueError("no prompts: set sample.prompts or sample.prompts_file")
  return prompts


def answer(model, params, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str],
           options: layout.DecodeOptions, max_new_tokens: int, max_len: int,
           ar: bool = False, rng: Any = None, on_block=None,
           isd_stride: int = 0) -> tuple[list[dict], dict]:
  """Answers each prompt on its own terms; a bad prompt is reported, not fatal.

  Prompts with ``<|mask:N|>`` spans are infilled (``infill``), the others continued
  (``generate``). A prompt that does not parse or fit gets ``{"prompt", "error"}``
  instead of a result, and the others are answered.

  Returns:
    (one dict per prompt, in order, each with ``prompt`` and either results or
    ``error``; the summary of the continued prompts, empty when there were none).
  """
  rows: list[dict | None] = [None] * len(prompts)
  continue_idx, infill_idx = [], []
  for i, p in enumerate(prompts):
    try:
      parsed = layout.parse(tokenizer, p)
      if parsed.maskable.any():
        if ar or isd_stride or options.token_shift:
          raise ValueError("<|mask:N|> infilling needs the block decoder (a diffusion "
                           "policy on a model without token_shift)")
        layout.infill_canvas([parsed], options.block_size, max_len)
        infill_idx.append(i)
      else:
        layout.generation_canvas([parsed.ids], max_new_tokens, options.block_size,
                                 tokenizer.mask_id, max_len)
        continue_idx.append(i)
    except (ValueError, TypeError) as e:
      rows[i] = {"prompt": p, "error": str(e)}
  summary = {}
  if continue_idx:
    out, summary = generate(model, params, tokenizer, [prompts[i] for i in continue_idx],
                            options, max_new_tokens, max_len, ar=ar, rng=rng,
                            on_block=on_block, isd_stride=isd_stride)
    for i, r in zip(continue_idx, out):
      rows[i] = {"prompt": prompts[i], **r}
  if infill_idx:
    out = infill(model, params, tokenizer, [prompts[i] for i in infill_idx], options,
                 max_len)
    for i, r in zip(infill_idx, out):
      rows[i] = {"prompt": prompts[i], "completion": r["text"], "spans": r["spans"],
                 "nfe": r["nfe"], "tokens": [int(t) for t in r["tokens"]]}
  return rows, summary


def _console_streamer(tokenizer):
  """Host callback printing each row's block as it is committed."""
  def on_block(block_index, tokens, active):
    for row in np.flatnonzero(np.asarray(active)):
      ids = np.asarray(tokens[row])
      # MASKs left in a committed block lie past the row's end or after its EOS.
      text = tokenizer.decode(ids[ids != tokenizer.mask_id], skip_special=False)
      print(f"[row {row} block {int(block_index[row])}] {text!r}", flush=True)
  return on_block


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """``--mode=sample``: loads the checkpoint, samples, streams, writes JSON to samples/."""
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  s = config.get("sample", None) or default_sample_config()
  config, model, tokenizer, params = inference.load_for_inference(workdir, config)
  block_size = config.diffusion.block_size
  max_len = s.max_len or config.data.seq_len
  prompts = read_prompts(s)
  options = options_from_config(s, block_size, tokenizer,
                                config.diffusion.get("token_shift", False))
  if s.get("compare_ar", False) and s.policy != "ar":
    return _run_compare(config, s, model, params, tokenizer, prompts, options, max_len,
                        workdir)
  on_block = (_console_streamer(tokenizer) if s.stream and s.policy not in ("ar", "isd")
              else None)
  with inference.inference_context(config):
    rows, summary = answer(model, params, tokenizer, prompts, options, s.max_new_tokens,
                           max_len, ar=s.policy == "ar", rng=jax.random.key(s.seed),
                           on_block=on_block,
                           isd_stride=s.isd_stride if s.policy == "isd" else 0)
  for r in rows:
    if "error" in r:
      print(f"{r['prompt']!r} -> ERROR: {r['error']}", file=sys.stderr, flush=True)
    elif "spans" in r:
      print(f"{r['prompt']!r} -> {r['completion']!r}  (infilled, NFE {r['nfe']})", flush=True)
    else:
      print(f"{r['prompt']!r} -> {r['completion']!r}  (NFE {r['nfe']}, TPF {r['tpf']:.2f}, "
            f"steps/block {r['steps_per_block']})", flush=True)
  if summary:
    print(f"{summary['tokens_per_s']:.1f} generated tokens/s (wall time includes "
          f"compilation)", file=sys.stderr)
  _write_samples(workdir, {"config": s.to_dict(), "summary": summary, "samples": rows})
  return rows


def _write_samples(workdir: str, record: dict) -> None:
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"samples_{time.strftime('%Y%m%d_%H%M%S')}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {path}", flush=True)


def _run_compare(config, s, model, params, tokenizer, prompts, options, max_len,
                 workdir) -> list[dict]:
  """``sample.compare_ar``: the decoder against greedy AR, each prompt alone and warm."""
  # speedup builds on generate() above, so it is imported when used.
  from blockdiff_jax.sampling import speedup  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  if s.temperature > 0:
    raise ValueError("sample.compare_ar compares greedy texts; set sample.temperature=0")
  dec = speedup.Decoder(s.policy, s.isd_stride if s.policy == "isd" else 0)
  print(f"decoding {len(prompts)} prompts by {dec.name} and by AR, each alone, warm "
        "(compilation excluded)", flush=True)
  with inference.inference_context(config):
    rows, summary = speedup.compare_with_ar(
        model, params, tokenizer, prompts, options, s.max_new_tokens, max_len, dec,
        log=lambda line: print(line, file=sys.stderr, flush=True))
  print(speedup.report(rows, summary), flush=True)
  _write_samples(workdir, {"config": s.to_dict(), "summary": summary, "samples": rows})
  return rows
