r"""The decoder before and after a refactor: identical tokens and NFE for every policy.

Decodes a fixed batch of synthetic-task prompts (mixed prompt lengths) with every policy
and decoder feature (threshold, factor, topk, entropy, margin, l2r, ar, sub-blocks,
editing, step caps, sampling, EOS early exit on and off, infilling) on a trained model
(``--config``, configs/synthetic.py by default, trained into ``--workdir`` unless it
already holds a run, whose own config then applies), and saves tokens, NFE and steps per
row; the results name the config. With ``--baseline``
it compares against a saved run: tokens must be identical everywhere; NFE must be
identical except on the sub-block cases, where rows no longer wait in lockstep and NFE
may only drop (both are reported).

  python experiments/decoder_equivalence.py --workdir=/tmp/dec_base/run --steps=300 \
      --write_baseline   # once, on the code before the change
  python experiments/decoder_equivalence.py --workdir=/tmp/dec_base/run
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np

from blockdiff_jax.data import synthetic
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.train import trainer

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_OUT = os.path.join(_HERE, "results", "decoder_equivalence")
_BASELINE = os.path.join(_HERE, "results", "decoder_equivalence_baseline.json")

N_PROMPTS = 12
MAX_NEW = 24
WIDTH = 64

# (name, DecodeOptions overrides, runner): runner "block" = decoder.decode, "ar" =
# ar.decode_ar, "infill" = decoder.decode on an infilling canvas. Sub-block cases are
# marked so their NFE may drop (rows no longer wait for the slowest in lockstep).
CASES = [
    ("threshold_0.9", dict(policy=policies.Threshold(0.9)), "block"),
    ("threshold_0.5", dict(policy=policies.Threshold(0.5)), "block"),
    ("threshold_1.0", dict(policy=policies.Threshold(1.0)), "block"),
    ("factor_1.0", dict(policy=policies.Factor(1.0)), "block"),
    ("topk_2", dict(policy=policies.TopK(2)), "block"),
    ("entropy_0.5", dict(policy=policies.EntropyBounded(0.5)), "block"),
    ("margin_0.5", dict(policy=policies.Margin(0.5)), "block"),
    ("l2r", dict(policy=policies.LeftToRight()), "block"),
    ("ar", dict(), "ar"),
    ("ar_sampled", dict(sampling=policies.Sampling(1.0, 8, 0.9)), "ar"),
    ("no_eos_stop", dict(policy=policies.Threshold(0.9), stop_at_eos=False), "block"),
    ("step_cap_3", dict(policy=policies.Threshold(0.9), max_steps_per_block=3), "block"),
    ("sampled_t1_topk8_topp0.9", dict(policy=policies.Threshold(0.7),
                                      sampling=policies.Sampling(1.0, 8, 0.9)), "block"),
    ("editing_0.8", dict(policy=policies.Threshold(0.7), edit_threshold=0.8, patience=2),
     "block"),
    ("sub4_threshold_0.9", dict(policy=policies.Threshold(0.9), sub_block_size=4), "block"),
    ("sub8_factor_1.0", dict(policy=policies.Factor(1.0), sub_block_size=8), "block"),
    ("sub4_l2r", dict(policy=policies.LeftToRight(), sub_block_size=4), "block"),
    ("sub4_editing", dict(policy=policies.Threshold(0.7), sub_block_size=4,
                          edit_threshold=0.8), "block"),
    ("sub4_no_eos_stop", dict(policy=policies.Threshold(0.9), sub_block_size=4,
                              stop_at_eos=False), "block"),
    ("sub4_step_cap_4", dict(policy=policies.Threshold(0.9), sub_block_size=4,
                             max_steps_per_block=4), "block"),
    ("infill_threshold_0.9", dict(policy=policies.Threshold(0.9), stop_at_eos=False),
     "infill"),
    ("infill_sub4", dict(policy=policies.Threshold(0.9), sub_block_size=4,
                         stop_at_eos=False), "infill"),
]


def _load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _canvases(config, tok):
  """The generation canvas and an infilling canvas of the same validation examples."""
  tasks = synthetic.parse_tasks(config.data.synthetic_tasks)
  examples = [synthetic.mixed_example(tasks, config.seed, i, split="validation",
                                      digits=config.data.synthetic_digits)
              for i in range(N_PROMPTS)]
  block = config.diffusion.block_size
  prompts = [layout.parse(tok, f"<|bos|>{p}<|sep|>").ids for _, p, _ in examples]
  gen = layout.generation_canvas(prompts, MAX_NEW, block, tok.mask_id,
                                 config.data.seq_len, WIDTH)
  # Infilling: the answer with a span in its middle masked, EOS after it (fixed).
  texts = []
  for i, (_, p, a) in enumerate(examples):
    cut = 1 + i % max(1, len(a) - 2)
    n = min(3 + i % 4, len(a) - cut) or 1
    texts.append(f"<|bos|>{p}<|sep|>{a[:cut]}<|mask:{n}|>{a[cut + n:]}<|eos|>")
  fill = layout.infill_canvas([layout.parse(tok, t) for t in texts], block,
                              config.data.seq_len, WIDTH)
  return gen, fill


def _run_case(model, params, tok, block, gen, fill, overrides, runner, seed):
  opts = decoder.DecodeOptions(block_size=block, mask_id=tok.mask_id, eos_id=tok.eos_id,
                               **overrides)
  rng = jax.random.key(seed)
  canvas = fill if runner == "infill" else gen
  if runner == "ar":
    call = lambda: ar_lib.decode_ar(model, params, canvas, opts, rng)
  else:
    call = lambda: decoder.decode(model, params, canvas, opts, rng,
                                  prefill_width=WIDTH - block)
  call()  # Compiles.
  walls = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = call()
    walls.append(time.perf_counter() - t0)
  rows = []
  for i in range(canvas.tokens.shape[0]):
    rows.append({"tokens": [int(t) for t in out["tokens"][i]], "nfe": int(out["nfe"][i]),
                 "steps": ([int(s) for s in out["steps"][i]] if "steps" in out else None),
                 "edits": int(out["edits"][i]) if "edits" in out else None})
  return {"rows": rows, "forwards": int(out["forwards"]), "wall_s": float(np.median(walls))}


def _compare(base: dict, new: dict) -> list[dict]:
  """Per case: tokens identical?, NFE identical?, NFE totals before/after."""
  table = []
  for name, _, _ in CASES:
    b, n = base["cases"].get(name), new["cases"][name]
    if b is None:
      table.append({"case": name, "missing_in_baseline": True})
      continue
    # zip() stops at the shorter list: a baseline with fewer rows (or none) would pass.
    same_rows = len(b["rows"]) == len(n["rows"])
    tok_same = same_rows and all(x["tokens"] == y["tokens"]
                                 for x, y in zip(b["rows"], n["rows"]))
    nfe_same = same_rows and all(x["nfe"] == y["nfe"] for x, y in zip(b["rows"], n["rows"]))
    steps_same = same_rows and all(x["steps"] == y["steps"]
                                   for x, y in zip(b["rows"], n["rows"]))
    table.append({
        "case": name, "sub_block": name.startswith(("sub", "infill_sub")),
        "tokens_identical": tok_same, "nfe_identical": nfe_same,
        "steps_identical": steps_same,
        "nfe_before": sum(x["nfe"] for x in b["rows"]),
        "nfe_after": sum(x["nfe"] for x in n["rows"]),
        "rows_before": len(b["rows"]), "rows_after": len(n["rows"]),
        "nfe_never_higher": same_rows and all(y["nfe"] <= x["nfe"]
                                              for x, y in zip(b["rows"], n["rows"])),
        "forwards_before": b["forwards"], "forwards_after": n["forwards"],
        "wall_s_before": b.get("wall_s"), "wall_s_after": n.get("wall_s")})
  return table


def _ok(row: dict) -> bool:
  if row.get("missing_in_baseline"):
    return False
  if row["sub_block"]:
    return row["tokens_identical"] and row["nfe_never_higher"]
  return row["tokens_identical"] and row["nfe_identical"] and row["steps_identical"]


def _shown_path(path: str) -> str:
  """``path`` relative to the repository when inside it (no machine path in results)."""
  rel = os.path.relpath(os.path.abspath(path), _ROOT)
  return path if rel.startswith(os.pardir) else rel


def model_label(config_path: str, workdir: str, steps: int, trained_here: bool,
                backend: str) -> str:
  """How the results name the decoded model: the config it was really trained with.

  ``--config`` only trains a workdir that has no checkpoint; an already trained workdir
  is loaded with its own saved config, whatever ``--config`` says.

  Args:
    config_path: ``--config``.
    workdir: ``--workdir``.
    steps: the loaded config's ``train.steps``.
    trained_here: whether this invocation trained the workdir (from ``--config``).
    backend: the JAX backend it trained on.
  """
  if trained_here:
    return f"{_shown_path(config_path)} trained {steps} steps here on {backend}"
  return (f"the run in {_shown_path(workdir)} (its saved config.json; --config unused), "
          f"trained {steps} steps")


def _write_md(table, meta, path):
  lines = ["# Decoder equivalence: before vs after the refactor", "",
           f"{meta['n_prompts']} synthetic validation prompts (mixed prompt lengths), "
           f"canvas width {WIDTH}, block {meta['block_size']}, up to {MAX_NEW} new tokens, "
           f"model: {meta.get('model', 'not recorded')}. "
           "NFE summed over rows; forwards = sequential forwards of the batch. Sub-block "
           "cases: tokens must be identical, NFE may drop (no lockstep). Wall time: median "
           "of 3 warm calls of the whole batch (a shared CPU: a rough guide only).", "",
           "| case | tokens identical | NFE identical | steps identical | NFE before | "
           "NFE after | forwards before | forwards after | ms before | ms after | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in table:
    if r.get("missing_in_baseline"):
      lines.append(f"| {r['case']} | - | - | - | - | - | - | - | - | - | missing in baseline |")
      continue
    ms = lambda w: "-" if w is None else f"{1000 * w:.0f}"
    lines.append(f"| {r['case']} | {r['tokens_identical']} | {r['nfe_identical']} | "
                 f"{r['steps_identical']} | {r['nfe_before']} | {r['nfe_after']} | "
                 f"{r['forwards_before']} | {r['forwards_after']} | "
                 f"{ms(r['wall_s_before'])} | {ms(r['wall_s_after'])} | {_ok(r)} |")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="training workdir (trained if empty)")
  ap.add_argument("--config", default=os.path.join(_ROOT, "configs", "synthetic.py"))
  ap.add_argument("--steps", type=int, default=300, help="training steps if not trained")
  ap.add_argument("--baseline", default=_BASELINE, help="saved run to compare against")
  ap.add_argument("--write_baseline", action="store_true",
                  help="save this run as the baseline instead of comparing")
  ap.add_argument("--out", default=_OUT)
  args = ap.parse_args()
  if not args.write_baseline and not os.path.isfile(args.baseline):
    # Found only after training and decoding every case, it used to cost the whole run.
    ap.error(f"--baseline={args.baseline!r} does not exist: write one first with "
             "--write_baseline (on the code before the change)")
  if args.steps < 1:
    ap.error(f"--steps={args.steps} must be >= 1")

  trained_here = not os.path.exists(os.path.join(args.workdir, "checkpoints"))
  if trained_here:
    config = _load_config(args.config)
    config.train.steps, config.train.eval_every = args.steps, 0
    config.train.checkpoint_every = args.steps
    t0 = time.time()
    trainer.run(config, args.workdir)
    print(f"trained {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
  config, model, tok, params = inference.load_for_inference(args.workdir)
  block = config.diffusion.block_size
  gen, fill = _canvases(config, tok)
  run = {"train_steps": int(config.train.steps), "n_prompts": N_PROMPTS,
         "block_size": block,
         "model": model_label(args.config, args.workdir, int(config.train.steps),
                              trained_here, jax.default_backend()),
         "cases": {}}
  t0 = time.time()
  for k, (name, overrides, runner) in enumerate(CASES):
    run["cases"][name] = _run_case(model, params, tok, block, gen, fill, overrides, runner,
                                   seed=k)
    done = k + 1
    eta = (time.time() - t0) / done * (len(CASES) - done)
    nfe = sum(r["nfe"] for r in run["cases"][name]["rows"])
    print(f"[{done}/{len(CASES)}] {name}: NFE {nfe}, forwards "
          f"{run['cases'][name]['forwards']} (ETA {eta:.0f} s)", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  if args.write_baseline:
    with open(args.baseline, "w", encoding="utf-8") as f:
      json.dump(run, f)
    print(f"wrote baseline {args.baseline}")
    return
  with open(args.baseline, encoding="utf-8") as f:
    base = json.load(f)
  table = _compare(base, run)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump({"comparison": table, "after": run}, f)
  _write_md(table, run, args.out + ".md")
  bad = [r["case"] for r in table if not _ok(r)]
  print(open(args.out + ".md", encoding="utf-8").read())
  if bad:
    print(f"NOT equivalent: {bad}", file=sys.stderr)
    sys.exit(1)
  print("equivalent: tokens identical for every case; NFE identical outside sub-blocks")


if __name__ == "__main__":
  main()
