r"""Decoding policies vs AR on the synthetic tasks: accuracy, TPF, tokens/s, speedup.

Trains configs/synthetic.py (or loads a finished workdir), then decodes N validation
examples of sort / add / copy_edit with every policy and threshold, and with AR decoding
of the same model in the same run. Writes JSON, a Markdown table and a PNG (accuracy vs
TPF) to experiments/results/.

  python experiments/decode_speed.py --workdir=/tmp/synth --steps=600 --n=96
"""

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np

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
  ar = _evaluate(model, params, tok, examples, base, args.max_new_tokens, max_len, ar=True)
  ar.update(policy="ar", value=None)
  results["runs"].append(ar)
  print(f"AR: {ar}", flush=True)
  sweep = SWEEP if not args.quick else [("threshold", 0.9), ("threshold", 0.7),
                                         ("factor", 1.0), ("topk", 1)]
  if args.policies:
    sweep = [(p.split(":")[0], float(p.split(":")[1]) if ":" in p else None)
             for p in args.policies.split(",")]
  # L2R right after AR: one token per forward in the block layout the model was trained
  # on, the in-distribution counterpart of the one-token-block AR baseline.
  sweep = [("l2r", None)] + [(n, v) for n, v in sweep if n != "l2r"]
  for name, value in sweep:
    opts = layout.DecodeOptions(block_size=block, mask_id=tok.mask_id, eos_id=tok.eos_id,
                                 policy=policies.make_policy(name, value))
    r = _evaluate(model, params, tok, examples, opts, args.max_new_tokens, max_len, ar=False)
    r.update(policy=name, value=value, speedup_vs_ar=r["tokens_per_s"] / ar["tokens_per_s"],
             accuracy_drop_points=100 * (ar["accuracy"] - r["accuracy"]))
    results["runs"].append(r)
    print(f"{name}={value}: acc {r['accuracy']:.3f} TPF {r['tpf']:.2f} "
          f"forwards {r['forwards']} (row NFE mean {r['mean_row_nfe']:.1f}) "
          f"{r['tokens_per_s']:.0f} tok/s ({r['speedup_vs_ar']:.2f}x AR)", flush=True)
  _write(results, args.out)


def _write(results, out):
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  lines = [f"# Decoding speed on the synthetic tasks ({results['machine']})", "",
           f"{results['n']} validation examples, block {results['block_size']}, "
           f"max {results['max_new_tokens']} new tokens, model trained "
           f"{results['train_steps']} steps. Greedy. NFE excludes the prompt prefill; "
           "commits ride along with the next block's first forward. forwards = sequential "
           "forwards of the whole batch; row NFE = mean forwards per row while active.", "",
           "| policy | value | accuracy | TPF | steps/block | forwards | row NFE | "
           "tokens/s | x AR | acc. drop (pts) |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["runs"]:
    steps = "-" if r["mean_steps_per_block"] is None else f"{r['mean_steps_per_block']:.2f}"
    lines.append(f"| {r['policy']} | {r['value'] if r['value'] is not None else '-'} | "
                 f"{100 * r['accuracy']:.1f}% | {r['tpf']:.2f} | {steps} | "
                 f"{r['forwards']} | {r['mean_row_nfe']:.1f} | "
                 f"{r['tokens_per_s']:.0f} | {r.get('speedup_vs_ar', 1.0):.2f} | "
                 f"{r.get('accuracy_drop_points', 0.0):.1f} |")
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(r["policy"] for r in results["runs"]):
    rs = [r for r in results["runs"] if r["policy"] == name]
    ax.plot([r["tpf"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=name)
  ax.set_xlabel("tokens per forward (TPF)")
  ax.set_ylabel("exact match (%)")
  ax.set_title("accuracy vs TPF")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=120)
  print(f"wrote {out}.json/.md/.png", flush=True)


if __name__ == "__main__":
  main()
