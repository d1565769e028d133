r"""Decoding policies vs AR on the synthetic tasks: accuracy, TPF, tokens/s, speedup.

Trains configs/synthetic.py (or loads a finished workdir), then decodes N validation
examples of sort / add / copy_edit with every policy and threshold, and with AR decoding
of the same model in the same run. Writes JSON, a Markdown table and a PNG (accuracy vs
TPF) to experiments/results/. --policies is checked before any training; a policy that
fails is a "not run" row and the sweep goes on; without an AR baseline the speed-ups are
null and the exit status is non-zero.

  python experiments/decode_speed.py --workdir=/tmp/synth --steps=600 --n=96
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import synthetic
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample
from blockdiff_jax.train import trainer

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

SWEEP = [("threshold", v) for v in (0.5, 0.7, 0.9, 0.95)] + \
        [("factor", v) for v in (0.5, 1.0, 2.0)] + \
        [("topk", v) for v in (1, 2, 4)] + \
        [("entropy", v) for v in (0.5, 1.5)] + \
        [("margin", v) for v in (0.5, 0.8)]


def _load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _examples(config, n):
  tasks = synthetic.parse_tasks(config.data.synthetic_tasks)
  rows = [synthetic.mixed_example(tasks, config.seed, i, split="validation",
                                  digits=config.data.synthetic_digits) for i in range(n)]
  return [(t, p, a, f"<|bos|>{p}<|sep|>") for t, p, a in rows]


def _evaluate(model, params, tok, examples, options, max_new, max_len, ar):
  prompts = [e[3] for e in examples]
  rows, summary = sample.generate(model, params, tok, prompts, options, max_new, max_len,
                                  ar=ar, warmup=True)
  correct = [synthetic.check(t, p, r["completion"]) for (t, p, _, _), r in zip(examples, rows)]
  steps = [s for r in rows for s in r["steps_per_block"]]
  return {"accuracy": float(np.mean(correct)), "tpf": summary["tpf"],
          "tokens_per_s": summary["tokens_per_s"], "forwards": summary["forwards"],
          "mean_row_nfe": summary["mean_row_nfe"], "max_row_nfe": summary["max_row_nfe"],
          "generated_tokens": summary["generated_tokens"], "wall_s": summary["wall_s"],
          "mean_steps_per_block": float(np.mean(steps)) if steps else None,
          "unique_experts": summary["unique_experts"]}


def parse_sweep(text: str, quick: bool) -> list[tuple[str, float | None]]:
  """(policy, value) pairs to decode, L2R first; every pair is built once here, so a typo
  in --policies fails before any training or decoding.

  Raises:
    ValueError: an entry of ``text`` names no policy, has a non-numeric value, or a
      value its policy refuses; the message names --policies and the entry.
  """
  sweep = SWEEP if not quick else [("threshold", 0.9), ("threshold", 0.7),
                                   ("factor", 1.0), ("topk", 1)]
  if text:
    sweep = []
    for entry in text.split(","):
      name, _, value = entry.strip().partition(":")
      try:
        sweep.append((name, float(value) if value else None))
      except ValueError:
        raise ValueError(f"--policies: {entry!r} has a non-numeric value") from None
  for name, value in sweep:
    try:
      policies.make_policy(name, value)
    except ValueError as e:
      raise ValueError(f"--policies: {name}:{value} is refused ({e})") from None
  # L2R right after AR: one token per forward in the block layout the model was trained
  # on, the in-distribution counterpart of the one-token-block AR baseline.
  return [("l2r", None)] + [(n, v) for n, v in sweep if n != "l2r"]


def speedup(tokens_per_s: float, ar: dict) -> float | None:
  """tokens/s against AR's in the same run; None when AR failed or decoded nothing."""
  base = ar.get("tokens_per_s")
  return tokens_per_s / base if base and math.isfinite(base) and base > 0 else None


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="training workdir (trained if empty)")
  ap.add_argument("--config", default=os.path.join(_ROOT, "configs", "synthetic.py"))
  ap.add_argument("--steps", type=int, default=0, help="training steps; 0 = config value")
  ap.add_argument("--n", type=int, default=96, help="validation examples")
  ap.add_argument("--max_new_tokens", type=int, default=24)
  ap.add_argument("--out", default=os.path.join(_HERE, "results", "decode_speed"))
  ap.add_argument("--quick", action="store_true", help="only a few policies")
  ap.add_argument("--policies", default="",
                  help="comma-separated name:value list replacing the sweep, e.g. threshold:0.9")
  args = ap.parse_args()
  if args.quick and args.out == ap.get_default("out"):
    # A smoke run is not a result: under the default name it would replace the real one.
    args.out = os.path.join(tempfile.gettempdir(), "decode_speed_quick")
  for flag, value, low in (("--n", args.n, 1), ("--max_new_tokens", args.max_new_tokens, 1),
                           ("--steps", args.steps, 0)):
    if value < low:
      ap.error(f"{flag} must be >= {low}, got {value}")
  try:
    sweep = parse_sweep(args.policies, args.quick)
  except ValueError as e:
    ap.error(str(e))

  config = _load_config(args.config)
  if args.steps:
    config.train.steps = args.steps
  if not os.path.exists(os.path.join(args.workdir, "checkpoints")):
    t0 = time.time()
    trainer.run(config, args.workdir)
    print(f"trained {config.train.steps} steps in {time.time() - t0:.0f} s", flush=True)
  config, model, tok, params = inference.load_for_inference(args.workdir)
  examples = _examples(config, args.n)
  block = config.diffusion.block_size
  max_len = config.data.seq_len
  base = layout.DecodeOptions(block_size=block, mask_id=tok.mask_id, eos_id=tok.eos_id)

  dev = jax.devices()[0]
  machine = (f"{dev.device_kind}, jax {jax.__version__}" if dev.platform == "gpu"
             else f"{os.cpu_count()}-core CPU, jax {jax.__version__}")
  results = {"machine": machine,
             "train_steps": int(config.train.steps), "n": args.n, "block_size": block,
             "max_new_tokens": args.max_new_tokens, "runs": []}
  started = time.perf_counter()
  cells = [("ar", None)] + sweep
  ar = {}
  for i, (name, value) in enumerate(cells):
    # One policy failing (an XLA error, a policy the model lacks) is a row of the table,
    # not the end of a sweep that may have trained for an hour first.
    try:
      if name == "ar":
        r = _evaluate(model, params, tok, examples, base, args.max_new_tokens, max_len, ar=True)
      else:
        opts = layout.DecodeOptions(block_size=block, mask_id=tok.mask_id, eos_id=tok.eos_id,
                                    policy=policies.make_policy(name, value))
        r = _evaluate(model, params, tok, examples, opts, args.max_new_tokens, max_len,
                      ar=False)
    except Exception as e:  # pylint: disable=broad-except
      r = {"error": f"{type(e).__name__}: {e}"}
    r.update(policy=name, value=value)
    if name == "ar":
      ar = r
    elif "error" not in r:
      r.update(speedup_vs_ar=speedup(r["tokens_per_s"], ar),
               accuracy_drop_points=(None if "error" in ar else
                                     100 * (ar["accuracy"] - r["accuracy"])))
    results["runs"].append(r)
    elapsed = time.perf_counter() - started
    eta = elapsed / (i + 1) * (len(cells) - i - 1)
    progress = f"[{i + 1}/{len(cells)}, {elapsed:.0f}s, ETA {eta:.0f}s]"
    if "error" in r:
      print(f"{progress} {name}={value}: not run ({r['error']})", file=sys.stderr, flush=True)
    else:
      x_ar = ("1.00" if name == "ar" else "-" if r["speedup_vs_ar"] is None
              else f"{r['speedup_vs_ar']:.2f}")
      print(f"{progress} {name}={value}: acc {r['accuracy']:.3f} TPF {r['tpf']:.2f} "
            f"forwards {r['forwards']} (row NFE mean {r['mean_row_nfe']:.1f}) "
            f"{r['tokens_per_s']:.0f} tok/s ({x_ar}x AR)", flush=True)
    # A killed or interrupted sweep (which may have trained for an hour first) keeps the
    # cells measured so far.
    _write(results, args.out, final=False)
  _write(results, args.out)
  if "error" in ar:
    raise SystemExit(f"the AR baseline failed ({ar['error']}); the table has no speed-up or "
                     "accuracy drop against AR")


def _write(results, out, final=True):
  """JSON (strict: NaN becomes null), a Markdown table and, when ``final``, the
  accuracy-vs-TPF plot."""
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(metrics_writer.finite_or_none(results), f, indent=2, allow_nan=False)
  lines = [f"# Decoding speed on the synthetic tasks ({results['machine']})", "",
           f"{results['n']} validation examples, block {results['block_size']}, "
           f"max {results['max_new_tokens']} new tokens, model trained "
           f"{results['train_steps']} steps. Greedy. NFE excludes the prompt prefill; "
           "commits ride along with the next block's first forward. forwards = sequential "
           "forwards of the whole batch; row NFE = mean forwards per row while active. "
           "x AR: tokens/s against AR's in this run (- when AR failed or decoded nothing).", "",
           "| policy | value | accuracy | TPF | steps/block | forwards | row NFE | "
           "tokens/s | x AR | acc. drop (pts) |", "|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for r in results["runs"]:
    value = fmt(r["value"], "g")
    if "error" in r:
      cell = (r["error"].splitlines() or [""])[0].replace("|", "\\|")
      lines.append(f"| {r['policy']} | {value} | not run: {cell} | | | | | | | |")
      continue
    is_ar = r["policy"] == "ar"
    lines.append(f"| {r['policy']} | {value} | "
                 f"{100 * r['accuracy']:.1f}% | {r['tpf']:.2f} | "
                 f"{fmt(r['mean_steps_per_block'], '.2f')} | "
                 f"{r['forwards']} | {r['mean_row_nfe']:.1f} | {r['tokens_per_s']:.0f} | "
                 f"{'1.00' if is_ar else fmt(r['speedup_vs_ar'], '.2f')} | "
                 f"{'0.0' if is_ar else fmt(r['accuracy_drop_points'], '.1f')} |")
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  if not final:
    return
  plot([r for r in results["runs"] if "error" not in r], out + ".png")
  print(f"wrote {out}.json/.md/.png", flush=True)


def plot(runs, path: str) -> None:
  """Exact match against TPF, one line per policy."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(r["policy"] for r in runs):
    rs = [r for r in runs if r["policy"] == name]
    ax.plot([r["tpf"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=name)
  ax.set_xlabel("tokens per forward (TPF)")
  ax.set_ylabel("exact match (%)")
  ax.set_title("accuracy vs TPF")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
