"""Every decoder on one model, in one run: quality against AR, TPF, tokens/s, speed-up.

The decoders, each greedy, on the prompts of a config, one prompt at a time (batch 1, the
regime where parallel decoding pays), each compiled and run once before it is timed:

- AR, the baseline;
- ISD at several strides (I-DLM; lossless when the model's LoRA is gated, since the
  verifier then runs the base weights);
- ISD with the adapter on every token (gated models only): I-DLM without the gate, whose
  verifier is the adapted model, so it is not lossless;
- Fast-dLLM v2 threshold decoding with sub-blocks;
- LLaDA 2.1 token editing (threshold plus re-masking of committed tokens);
- left-to-right, one token per step inside each block.

ISD needs a token-shifted model; the block decoders run on any model, but only a model
trained by a block-diffusion objective (``bd3`` or ``fastdllm``) gives them good text,
which the quality columns show. Quality is agreement with AR's greedy text: token accuracy
over AR's tokens and whole-answer exact match.

  python experiments/compare_decoders.py --config=configs/smollm2.py --workdir=runs/smollm2
  python experiments/compare_decoders.py --quick      # two prompts, 16 tokens, strides 2, 4

A workdir without a checkpoint uses the config's ``init.pretrained`` weights (the model
before any adaptation); point ``--workdir`` at an adapted run to compare after training.
Writes experiments/results/compare_decoders.{json,md,png}.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

from blockdiff_jax.checkpoint import inference
from blockdiff_jax.sampling import sample

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def decoders(strides, token_shift: bool, gated: bool, block_size: int,
             sub_block: int = 8) -> list[tuple[str, dict, bool]]:
  """(name, sample-section fields, adapter on every token) of each decoder to run."""
  out = [("ar", {"policy": "ar"}, False)]
  if token_shift:
    out += [(f"isd N={n}", {"policy": "isd", "isd_stride": n}, False) for n in strides]
    if gated:
      n = 4 if 4 in strides else strides[0]
      out.append((f"isd N={n} ungated", {"policy": "isd", "isd_stride": n}, True))
  sub = sub_block if block_size % sub_block == 0 and sub_block < block_size else 0
  threshold = {"policy": "threshold", "policy_value": 0.9, "sub_block_size": sub}
  out.append((f"fast-dllm v2 (0.9, sub {sub or block_size})", threshold, False))
  out.append(("llada2.1 editing", {**threshold, "edit_threshold": 0.9}, False))
  out.append(("left-to-right", {"policy": "l2r"}, False))
  return out


def ungated(model):
  """The same model with its LoRA adapters applied to every token (no MASK gate)."""
  cfg = model.cfg
  return model.clone(cfg=dataclasses.replace(
      cfg, lora=dataclasses.replace(cfg.lora, gated=False)))


def is_gated(model) -> bool:
  cfg = getattr(model, "cfg", None)
  return bool(cfg is not None and cfg.lora is not None and cfg.lora.gated)


def run_decoder(model, params, tok, config, prompts, fields, max_new, max_len, block_size):
  """Greedy answers of one decoder, one prompt at a time: (rows, wall seconds)."""
  s = config.sample.copy_and_resolve_references()
  for k, v in fields.items():
    s[k] = v
  opts = sample.options_from_config(s, block_size, tok,
                                    config.diffusion.get("token_shift", False))
  rows, wall = [], 0.0
  for p in prompts:
    r, summary = sample.generate(
        model, params, tok, [p], opts, max_new, max_len, ar=s.policy == "ar",
        isd_stride=s.isd_stride if s.policy == "isd" else 0, warmup=True)
    rows.append(r[0])
    wall += summary["wall_s"]
  return rows, wall


def agreement(rows, ref_rows, tok):
  """(token accuracy over AR's tokens, exact-match fraction) of rows against AR's; the
  accuracy is None when AR produced no tokens (nothing to agree with)."""
  hits = total = exact = 0
  for r, a in zip(rows, ref_rows):
    got, want = tok.encode(r["completion"]), tok.encode(a["completion"])
    total += len(want)
    hits += sum(int(x == y) for x, y in zip(got, want))
    exact += int(r["completion"] == a["completion"])
  return (hits / total if total else None), exact / len(rows)


def one_line(error: str) -> str:
  """``error`` fit for a Markdown table cell: its first line, pipes escaped (XLA's
  messages run over many lines)."""
  return (error.splitlines() or [""])[0].replace("|", "\\|")


def baseline_error(results) -> str | None:
  """Why the AR baseline has no numbers (None when it ran)."""
  ar = next((r for r in results if r["decoder"] == "ar"), None)
  if ar is None:
    return "not in the decoder list"
  return ar.get("error")


def run_all(model, params, tok, config, prompts, table, max_new, max_len, block_size):
  """Runs every decoder of ``table``; one result dict per decoder, in order.

  A decoder that raises gets ``{"decoder", "error"}`` and the others still run: one bad
  decoder never stops the table. Quality (agreement) and ``speedup_vs_ar`` are measured
  against the decoder named ``ar`` only; when it failed they are None, never computed
  against whichever decoder happened to run first.
  """
  results, ref = [], None
  for name, fields, all_tokens in table:
    t0 = time.perf_counter()
    try:
      rows, wall = run_decoder(ungated(model) if all_tokens else model, params, tok,
                               config, prompts, fields, max_new, max_len, block_size)
    except Exception as e:  # pylint: disable=broad-except
      # Any failure (a policy the model lacks, an XLA error) is recorded in the table.
      error = f"{type(e).__name__}: {e}"
      print(f"{name}: not run ({error})", file=sys.stderr)
      results.append({"decoder": name, "error": error})
      continue
    gen = sum(r["generated_tokens"] for r in rows)
    nfe = sum(r["nfe"] for r in rows)
    r = {"decoder": name, "generated_tokens": gen, "nfe": nfe, "tpf": gen / max(nfe, 1),
         "tokens_per_s": gen / wall if wall > 0 else None, "wall_s": wall,
         "token_accuracy": None, "exact_match": None, "speedup_vs_ar": None,
         "total_s": time.perf_counter() - t0, "completions": [x["completion"] for x in rows]}
    if name == "ar":
      ref = (rows, r["tokens_per_s"])
    if ref is not None:
      r["token_accuracy"], r["exact_match"] = agreement(rows, ref[0], tok)
      # AR decoding nothing (EOS first) or untimed leaves no rate to divide by.
      if ref[1] and r["tokens_per_s"] is not None:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ref[1]
    results.append(r)
    acc = "-" if r["token_accuracy"] is None else f"{r['token_accuracy']:.3f}"
    quality = ("no AR baseline" if ref is None else
               f"token acc {acc}  exact {r['exact_match']:.2f}")
    rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:7.1f}"
    print(f"{name:>14}: TPF {r['tpf']:.2f}  {rate} tok/s  {quality}",
          flush=True)
  return results


def plot(results, path: str) -> None:
  """Token agreement against speed-up, one point per decoder (skipped without matplotlib)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.scatter([r["speedup_vs_ar"] for r in results], [r["token_accuracy"] for r in results])
  for r in results:
    ax.annotate(r["decoder"], (r["speedup_vs_ar"], r["token_accuracy"]), fontsize=8)
  ax.set_xlabel("speed-up vs AR (tokens/s, batch 1)")
  ax.set_ylabel("token agreement with AR")
  ax.set_title("quality against speed-up")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(_HERE, "..", "configs", "smollm2.py"))
  ap.add_argument("--workdir", default=os.path.join("runs", "compare_decoders"))
  ap.add_argument("--max_new_tokens", type=int, default=48)
  ap.add_argument("--strides", default="2,3,4,6,8")
  ap.add_argument("--quick", action="store_true", help="two prompts, 16 tokens, strides 2,4")
  ap.add_argument("--out", default=os.path.join(_HERE, "results", "compare_decoders"))
  args = ap.parse_args()
  if args.quick and args.out == ap.get_default("out"):
    # A smoke run is not a result: under the default name it would replace the real one.
    args.out = os.path.join(tempfile.gettempdir(), "compare_decoders_quick")
  try:
    strides = [int(x) for x in args.strides.split(",")]
  except ValueError:
    ap.error(f"--strides must be comma-separated integers, got {args.strides!r}")
  if min(strides) < 2:  # ISD verifies N-1 drafts per forward.
    ap.error(f"--strides must all be >= 2, got {args.strides!r}")
  if args.max_new_tokens < 1:
    ap.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  max_new = args.max_new_tokens
  config = _load_config(args.config)
  prompts = sample.read_prompts(config.sample)
  if args.quick:
    prompts, max_new, strides = prompts[:2], 16, [2, 4]
  config, model, tok, params = inference.load_for_inference(args.workdir, config)
  max_len = config.sample.max_len or config.data.seq_len
  token_shift = config.diffusion.get("token_shift", False)
  block_size = config.diffusion.block_size
  if config.diffusion.get("objective", "bd3") == "introspective":
    block_size = 32  # The objective has no blocks; the block decoders use Fast-dLLM v2's.
  with inference.inference_context(config):
    results = run_all(model, params, tok, config, prompts, decoders(
        strides, token_shift, is_gated(model), block_size), max_new, max_len, block_size)
  ar_error = baseline_error(results)
  meta = {"config": os.path.relpath(args.config), "workdir": os.path.relpath(args.workdir), "prompts": len(prompts),
          "max_new_tokens": max_new, "batch": 1, "jax": jax.__version__,
          "device": jax.devices()[0].device_kind, "machine": platform.machine(),
          "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "ar_error": ar_error, "results": results}, f, indent=2,
              allow_nan=False)
  lines = [f"# Decoders on one model ({os.path.basename(args.config)}, batch 1)", "",
           f"`{meta['command']}` on {meta['device']} ({meta['cpus']} CPUs), jax "
           f"{meta['jax']}; {len(prompts)} prompts, up to {max_new} new tokens each; "
           "quality = agreement with AR's greedy text.", ""]
  if ar_error:
    lines += [f"**The AR baseline failed ({one_line(ar_error)}): no quality or speed-up against AR "
              "is reported.**", ""]
  lines += ["| decoder | TPF | tokens/s | speed-up vs AR | token accuracy | exact match |",
            "|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['decoder']} | not run: {one_line(r['error'])} | | | | |")
    else:
      # No AR baseline: "-" rather than a number measured against another decoder.
      fmt = lambda v, f, unit="": "-" if v is None else format(v, f) + unit
      lines.append(f"| {r['decoder']} | {r['tpf']:.2f} | {fmt(r['tokens_per_s'], '.1f')} | "
                   f"{fmt(r['speedup_vs_ar'], '.2f', 'x')} | "
                   f"{fmt(r['token_accuracy'], '.3f')} | {fmt(r['exact_match'], '.2f')} |")
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  ok = [r for r in results if r.get("speedup_vs_ar") is not None
        and r.get("token_accuracy") is not None]
  if ok:  # Without the AR baseline there is nothing to place on these axes.
    plot(ok, args.out + ".png")
  print("\n".join(lines))
  if ar_error:
    # Written out, but not a finished comparison: say so in the exit status too.
    raise SystemExit(f"the AR baseline failed ({ar_error}); the table has no "
                     "quality or speed-up against AR")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
