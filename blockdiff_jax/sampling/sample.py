r"""Text-level sampling API, the ``sample`` config section and ``--mode=sample``.

  python -m blockdiff_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=sample --config.sample.prompts="<|bos|>sort: 3 1 2<|sep|>"

The library calls (``generate``, ``infill``, ``answer``) and the metrics they report are
in ``sampling/generation.py``; they are re-exported here.
"""

import itertools
import json
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np

from blockdiff_jax import metrics_writer
from blockdiff_jax.data import tokenizers
from blockdiff_jax.model import kv_memory
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import speedup

# The library calls, under the names notebooks and tests have always used.
generate = generation.generate
infill = generation.infill
answer = generation.answer


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
  # Decoder KV cache: full (every position exact) | hierarchical (exact ring of recent
  # chunks, rank-r factors of older ones; sampling/hierarchical_cache.py).
  s.kv_cache = "full"
  s.kv_window = 2  # hierarchical: whole chunks kept exact before the one being filled.
  # chunk 256 / rank 6: 12.5% of SmolLM2's full cache at 131k, KL 0.006 nats at 2k tokens
  # (experiments/results/long_context_cache.md).
  s.kv_chunk = 256  # hierarchical: positions per compressed chunk (>= block / ISD stride).
  s.kv_rank = 6  # hierarchical: rank of each chunk's K and V per layer and KV head.
  s.kv_sinks = 1  # hierarchical: chunks at the start kept exact (attention sinks).
  # hierarchical: rank (older chunks as rank-r factors) | summary (a summary-token model:
  # older blocks are read through their summary slots only; block decoder).
  s.kv_form = "rank"
  s.temperature = 0.0  # 0 = greedy.
  s.top_k = 0  # Keep the k most likely tokens when sampling; 0 = all.
  s.top_p = 1.0  # Nucleus mass when sampling; 1 = all.
  s.max_steps_per_block = 0  # Step cap per block; 0 = one per token (+ patience).
  s.patience = 1  # With editing: steps without change before a block exits.
  s.edit_threshold = 0.0  # tau_edit of LLaDA 2.1 token editing; 0 (or 1) = off.
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
  if not one_token and s.policy not in policies.POLICIES:
    # make_policy's own message lists only the block policies, not ar and isd.
    raise ValueError(f"sample.policy must be one of {sorted(policies.POLICIES) + ['ar', 'isd']}"
                     f", got {s.policy!r}")
  if s.policy == "isd" and not token_shift:  # As isd.check_setup, before a checkpoint loads.
    raise ValueError("sample.policy='isd' needs a token-shifted model "
                     "(diffusion.token_shift=True): its verifier is the logits of the "
                     "previous position")
  kind = s.get("kv_cache", "full")
  if kind not in ("full", "hierarchical"):
    raise ValueError(f"sample.kv_cache must be 'full' or 'hierarchical', got {kind!r}")
  hierarchy = None
  if kind == "hierarchical":
    widest = s.isd_stride if s.policy == "isd" else (1 if s.policy == "ar" else block_size)
    if s.kv_chunk < widest:
      raise ValueError(f"sample.kv_chunk={s.kv_chunk} is smaller than one commit of this "
                       f"decoder ({widest} positions: the block size or ISD stride)")
    hierarchy = kv_memory.hierarchy_from_config(s)
    if one_token and hierarchy.form == "summary":  # AR and ISD keep no summary slots.
      raise ValueError(f"sample.kv_form='summary' works with the block decoder of a "
                       f"summary-token model, not sample.policy={s.policy!r}; use 'rank'")
  if not one_token:
    try:
      policy = policies.make_policy(s.policy, s.policy_value)
    except ValueError as e:
      raise ValueError(f"sample.policy_value={s.policy_value} is out of range for "
                       f"sample.policy={s.policy!r}: {e}") from None
  else:
    policy = policies.make_policy("threshold")  # Unused by the AR and ISD decoders.
  try:
    return layout.DecodeOptions(
        block_size=block_size, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id,
        policy=policy,
        sampling=policies.Sampling(s.temperature, s.top_k, s.top_p),
        sub_block_size=s.sub_block_size, dual_cache=s.get("dual_cache", False),
        max_steps_per_block=s.max_steps_per_block,
        edit_threshold=s.edit_threshold, patience=s.patience, token_shift=token_shift,
        kv_hierarchy=hierarchy)
  except ValueError as e:
    raise ValueError(_config_paths(str(e))) from None


# DecodeOptions' own field names, as the flags a user types (--config.sample.patience=0).
_SAMPLE_FIELDS = re.compile(r"(?<![\w.])(sub_block_size|max_steps_per_block|edit_threshold|"
                            r"patience)\b")
_BLOCK_SIZE = re.compile(r"(?<![\w.])block_size\b")


def _config_paths(message: str) -> str:
  """A ``DecodeOptions`` error with its field names spelled as config paths."""
  return _SAMPLE_FIELDS.sub(r"sample.\1", _BLOCK_SIZE.sub("diffusion.block_size", message))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``sample`` field; builds nothing on a device.

  Runs ``options_from_config``'s checks (with the byte tokenizer's ids: only the ids
  differ between tokenizers). The ``kv_*`` fields are checked even with
  ``kv_cache="full"``, because ``--mode=plan`` sizes the hierarchical cache from them.
  """
  s = config.get("sample")
  if s is None:
    return
  if s.max_new_tokens < 1:
    raise ValueError(f"sample.max_new_tokens must be >= 1, got {s.max_new_tokens}")
  if s.max_len < 0:
    raise ValueError(f"sample.max_len must be >= 0 (0 = data.seq_len), got {s.max_len}")
  if s.isd_stride < 2:  # As isd.py requires: one pending token plus at least one draft.
    raise ValueError(f"sample.isd_stride must be >= 2, got {s.isd_stride}")
  seed = s.get("seed", 0)
  # jax.random.key keeps 32 bits: seed 2**32 would silently draw as seed 0.
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise ValueError(f"sample.seed must be an integer in [0, 2**32), got {seed!r}")
  if not s.get("prompts_file", "") and not [p for p in s.get("prompts", "").split(";") if p]:
    raise ValueError("no prompts: set sample.prompts or sample.prompts_file")
  if "kv_chunk" in s:
    kv_memory.hierarchy_from_config(s)
  if s.get("compare_ar", False) and s.policy == "ar":
    raise ValueError("sample.compare_ar=True compares a diffusion decoder with AR; "
                     "sample.policy='ar' is AR itself")
  if s.get("compare_ar", False) and s.temperature > 0:
    # As _run_compare refuses it, but before the checkpoint loads.
    raise ValueError(f"sample.compare_ar=True compares greedy texts; set "
                     f"sample.temperature=0, got {s.temperature}")
  diffusion = config.get("diffusion") or {}
  options_from_config(s, diffusion.get("block_size", 1), tokenizers.ByteTokenizer(),
                      diffusion.get("token_shift", False))


def read_prompts(s: ml_collections.ConfigDict) -> list[str]:
  """Prompts from ``prompts_file`` (one per line) or the ';'-separated ``prompts``.

  Raises:
    ValueError: naming the file and byte offset when it is not UTF-8.
  """
  if s.prompts_file:
    with open(s.prompts_file, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8-sig")  # A byte-order mark is not part of the first prompt.
    except UnicodeDecodeError as e:
      line = raw.count(b"\n", 0, e.start) + 1
      raise ValueError(f"prompts file {s.prompts_file} is not UTF-8: byte offset {e.start} "
                       f"(line {line}) holds {raw[e.start:e.end]!r} ({e.reason})") from None
    # A CRLF file (a Windows editor's) ends lines with "\r\n": the "\r" is the line end,
    # not the last character of the prompt the model should continue.
    prompts = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
  else:
    prompts = [p for p in s.prompts.split(";") if p]
  if not prompts:
    raise ValueError("no prompts: set sample.prompts or sample.prompts_file")
  return prompts


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
  # Before the checkpoint loads (minutes for a real model): a missing, empty or non-UTF-8
  # prompts file is then reported at once.
  prompts = read_prompts(s)
  config, model, tokenizer, params = inference.load_for_inference(workdir, config)
  validate(config)  # With the run's own diffusion settings; before anything compiles.
  block_size = config.diffusion.block_size
  max_len = s.max_len or config.data.seq_len
  options = options_from_config(s, block_size, tokenizer,
                                config.diffusion.get("token_shift", False))
  if s.get("compare_ar", False):
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


def _write_samples(workdir: str, record: dict) -> str:
  """Writes ``record`` to a new ``samples/samples_<time>[_<n>].json``; returns its path.

  The file is created exclusively: two runs in the same second get two files, never one
  overwriting the other.
  """
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"samples_{time.strftime('%Y%m%d_%H%M%S')}")
  for n in itertools.count():
    path = f"{stem}_{n}.json" if n else f"{stem}.json"
    try:
      f = open(path, "x", encoding="utf-8")
    except FileExistsError:
      continue
    with f:
      json.dump(metrics_writer.finite_or_none(record), f, indent=2, allow_nan=False)
    break
  print(f"wrote {path}", flush=True)
  return path


def _run_compare(config, s, model, params, tokenizer, prompts, options, max_len,
                 workdir) -> list[dict]:
  """``sample.compare_ar``: the decoder against greedy AR, each prompt alone and warm."""
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
