r"""Trained short, evaluated 16x longer: passkey / KV recall with full attention, summary
tokens, YaRN, the extension fine-tune and the hierarchical cache, in one run.

Two small block-diffusion models are trained from scratch on retrieval prompts of at
most 256 tokens (configs/long_context_retrieval.py): one with full attention and one
with ChatDLM summary tokens (2 slots per block of 16, the last 2 blocks in full). Each is
then extended with configs/long_context_extension.py (YaRN x4, a short fine-tune at
1,024 tokens). Every variant answers the same prompts (data/long_context.py: needle at
a controlled depth in standard-library docstrings) of 256 to 4,096 tokens with the block
decoder, scored by exact match:

  full            full attention as trained (RoPE unscaled)
  full+yarn       the same weights with YaRN x16 at evaluation, no fine-tune
  full+ext        after the extension fine-tune (YaRN x4)
  full+ext+hier   the same with the hierarchical cache (rank form, sampling/hierarchical_cache.py)
  summary ...     the same four rows for the summary-token model; its cache is the
                  summary form (the last W chunks exact, older blocks only as slots)

  python experiments/long_context_retrieval.py --steps 5000  # on a GPU
  python experiments/long_context_retrieval.py --quick    # ~10 min smoke run on a CPU
On a 2-core CPU a full-attention source model retrieves after two phases (prompt scored,
then answer only; experiments/results/long_context_retrieval_cpu.md, about 2 hours; the
summary-token model does not, after the same recipe); point --runs at a folder whose
``full`` (or ``summary``) is that run:
  python experiments/long_context_retrieval.py --runs R --models full --steps 800 \
      --tasks passkey --train_tasks passkey \
      --train_overrides data.long_context_score_prompt=False
  python experiments/long_context_retrieval.py --rerender # tables/plot from the JSON
A needle-depth curriculum (needles near the prompt's start for the first steps, then
anywhere: a copy forms at one place before it must search; it taught a small summary-slot
model to retrieve in experiments/summary_copy_probe.py) for the source models:
  python experiments/long_context_retrieval.py --steps 5000 --curriculum_steps 1500
or a fixed band that then widens to [0, 1] (the 4-slot model's first whole keys on a CPU,
results/long_context_retrieval_cpu.md "Stop 51"):
  python experiments/long_context_retrieval.py --steps 5000 --curriculum_steps 3000 \
      --curriculum widen --curriculum_hold 1500
Training runs go to --runs (default /tmp/long_context_retrieval) and resume there.
Writes experiments/results/long_context_retrieval.{json,md,png} after each variant (a
failed one is listed under errors; --quick: long_context_retrieval_quick.* in the
temporary folder, a smoke run not being a result).
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax

from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import long_context as tasks_lib
from blockdiff_jax.evaluation import long_context
from blockdiff_jax.sampling import sample as sample_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "long_context_retrieval.py")
EXTENSION = os.path.join(ROOT, "configs", "long_context_extension.py")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One evaluated row: a trained workdir, RoPE scaling at evaluation and a cache."""

  name: str
  workdir: str  # Relative to --runs.
  yarn_factor: float = 0.0  # > 0: YaRN over the training length, set at evaluation.
  cache: str = "full"  # full | rank | summary.


def variants(ext_factor: int, eval_factor: int,
             models: Sequence[str] = ("full", "summary"), extension: bool = True) -> list[Variant]:
  """The evaluated variants; ``extension=False`` (``--ext_steps 0``) leaves out the x-ext ones."""
  out = []
  for model in models:
    compressed = "rank" if model == "full" else "summary"
    out += [Variant(model, model, cache=compressed if model == "summary" else "full"),
            Variant(f"{model}+yarn{eval_factor}", model, yarn_factor=eval_factor,
                    cache=compressed if model == "summary" else "full")]
    if not extension:
      continue
    out.append(Variant(f"{model}+ext{ext_factor}", f"{model}_x{ext_factor}",
                       cache=compressed if model == "summary" else "full"))
    if model == "full":
      out.append(Variant(f"full+ext{ext_factor}+hier", f"full_x{ext_factor}", cache="rank"))
  return out


def _run(cmd: list[str], log: str) -> None:
  print("$ " + " ".join(cmd), flush=True)
  with open(log, "a", encoding="utf-8") as f:
    proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
  if proc.returncode:
    with open(log, encoding="utf-8") as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"command failed ({proc.returncode}), log {log}:\n{tail}")


def _last_step(workdir: str) -> int:
  """The newest finished checkpoint's step (Orbax names them by step), or -1."""
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=-1)


def lineage(workdir: str, step: int = -1) -> str:
  """How a source model was trained: its steps (``step`` when >= 0, else its newest
  checkpoint's), then those of each ``init_from`` run."""
  parts = []
  for _ in range(8):  # A chain longer than this is not one of ours.
    try:
      config = checkpoints.load_config(workdir)
    except (OSError, ValueError):  # A source run deleted since: say so, don't fail the grid.
      parts.append(f"{os.path.basename(os.path.normpath(workdir))}: not found")
      break
    steps = step if step >= 0 and not parts else _last_step(workdir)
    parts.append(f"{os.path.basename(os.path.normpath(workdir))}: {steps} steps")
    src = config.get("init_from", {}).get("workdir", "")
    if not src:
      break
    step = config.init_from.step
    parts[-1] += f" from {os.path.basename(os.path.normpath(src))}@" + (
        str(step) if step >= 0 else "latest")
    workdir = src
  return "; ".join(parts)


def train(runs: str, steps: int, ext_factor: int, ext_steps: int, slots: int,
          models: Sequence[str], train_tasks: str = "",
          overrides: Sequence[str] = (), source_overrides: Sequence[str] = ()) -> dict:
  """Trains (or resumes) the source models and their extensions; returns wall times.

  ``overrides`` (``field=value``) apply to every training run, ``source_overrides``
  (the needle-depth curriculum) to the source models only.
  """
  seconds = {}
  for model in models:
    extra = [f"--config.model.summary.num_slots={slots if model == 'summary' else 0}"]
    if train_tasks:
      extra.append(f"--config.data.long_context_tasks={train_tasks}")
    extra += [f"--config.{o}" for o in overrides]
    src = os.path.join(runs, model)
    if _last_step(src) < steps:
      t0 = time.time()
      _run([sys.executable, "-m", "blockdiff_jax.main", f"--config={CONFIG}",
            f"--workdir={src}", "--mode=train", f"--config.train.steps={steps}",
            f"--config.train.checkpoint_every={steps}", f"--config.train.eval_every={steps}",
            *extra, *[f"--config.{o}" for o in source_overrides]],
           os.path.join(runs, f"{model}.log"))
      seconds[model] = time.time() - t0
    ext = os.path.join(runs, f"{model}_x{ext_factor}")
    if ext_steps and _last_step(ext) < ext_steps:
      t0 = time.time()
      _run([sys.executable, "-m", "blockdiff_jax.main",
            f"--config={EXTENSION}:long_context_retrieval,{ext_factor}",
            f"--config.init_from.workdir={src}", f"--workdir={ext}", "--mode=train",
            f"--config.train.steps={ext_steps}", f"--config.train.checkpoint_every={ext_steps}",
            f"--config.train.eval_every={ext_steps}", "--config.train.log_every=10",
            *extra], os.path.join(runs, f"{model}_x{ext_factor}.log"))
      seconds[f"{model}_x{ext_factor}"] = time.time() - t0
  return seconds


def evaluate(runs: str, variant: Variant, examples, args) -> list[dict]:
  workdir = os.path.join(runs, variant.workdir)
  config = checkpoints.load_config(workdir)
  if variant.yarn_factor:
    rs = config.model.rope_scaling
    rs.type, rs.factor = "yarn", float(variant.yarn_factor)
    rs.original_max_position = config.data.seq_len
  s = config.sample
  s.max_len = max(e.length for e in examples) + 2 + args.max_new_tokens + 16
  if variant.cache != "full":
    s.kv_cache, s.kv_form = "hierarchical", variant.cache
    # The summary model's cache is exact only with its own window.
    window = (config.model.summary.window_blocks if config.model.summary.num_slots
              else args.hier_window)
    s.kv_window, s.kv_chunk, s.kv_rank, s.kv_sinks = window, args.chunk, args.rank, 1
  # --eval_step picks a source model's checkpoint; extensions are read at their newest.
  source = variant.workdir in args.models.split(",")
  step = args.eval_step if args.eval_step >= 0 and source else None
  _, model, tok, params = inference.load_for_inference(workdir, config, step=step)
  options = sample_lib.options_from_config(s, config.diffusion.block_size, tok)
  done, start = [0], time.time()

  def progress(_, row):
    done[0] += 1
    if done[0] % max(1, len(examples) // 8) == 0 or done[0] == len(examples):
      rate = done[0] / (time.time() - start)
      print(f"  {variant.name}: [{done[0]}/{len(examples)}] n={row['length']} "
            f"{'hit ' if row['hit'] else 'miss'} {row['completion']!r} vs {row['answer']!r} "
            f"({rate * 60:.0f}/min, ETA {(len(examples) - done[0]) / rate:.0f} s)", flush=True)

  with inference.inference_context(config):
    rows = long_context.retrieval(model, params, tok, examples, options,
                                  max_new_tokens=args.max_new_tokens, decoder="block",
                                  wrap=True, batch_size=args.batch_size,
                                  on_example=progress)
  return [{"variant": variant.name, **r} for r in rows]


def numbers(ap, args, flag: str, cast, ok, want: str) -> list:
  """``--flag``'s comma-separated values, or the parser's error naming the flag and value."""
  text = getattr(args, flag)
  try:
    values = [cast(x) for x in text.split(",")]
  except ValueError:
    ap.error(f"--{flag}={text!r}: comma-separated numbers expected")
  if not all(ok(v) for v in values) or len(set(values)) != len(values):
    ap.error(f"--{flag}={text!r}: {want}, each once")
  return values


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, refused by name before any training (an hour on a CPU) starts."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", default="/tmp/long_context_retrieval")
  ap.add_argument("--models", default="full,summary", help="full and/or summary")
  ap.add_argument("--steps", type=int, default=600, help="source training steps")
  ap.add_argument("--slots", type=int, default=2, help="summary slots per block")
  ap.add_argument("--eval_step", type=int, default=-1,
                  help="checkpoint of the source models to evaluate (-1 = the newest)")
  ap.add_argument("--ext_factor", type=int, default=4)
  ap.add_argument("--ext_steps", type=int, default=50, help="0 = no extension variants")
  ap.add_argument("--eval_factor", type=int, default=16, help="YaRN factor without tuning")
  ap.add_argument("--lengths", default="256,512,1024,2048,4096")
  ap.add_argument("--depths", default="0.1,0.5,0.9")
  ap.add_argument("--per_cell", type=int, default=4)
  ap.add_argument("--tasks", default="passkey,kv_recall")
  ap.add_argument("--train_tasks", default="",
                  help="data.long_context_tasks to train on ('' = the config's)")
  ap.add_argument("--train_overrides", default="",
                  help="comma-separated config overrides for every training run, e.g. "
                       "data.long_context_score_prompt=False")
  ap.add_argument("--curriculum_steps", type=int, default=0,
                  help="source training steps whose needles sit at --curriculum_depths "
                       "(data.long_context_curriculum_steps; 0 = none)")
  ap.add_argument("--curriculum_depths", default="0,0.05",
                  help="'low,high' needle depths under the curriculum")
  ap.add_argument("--curriculum", default="switch", choices=tasks_lib.CURRICULA,
                  help="switch: that band, then [0, 1]; widen: it grows to [0, 1]")
  ap.add_argument("--curriculum_hold", type=int, default=0,
                  help="widen: the first N curriculum steps hold the band before it grows "
                       "(data.long_context_curriculum_hold)")
  ap.add_argument("--num_pairs", type=int, default=2, help="as the model was trained")
  ap.add_argument("--max_new_tokens", type=int, default=16)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--chunk", type=int, default=64, help="hierarchical cache chunk")
  ap.add_argument("--rank", type=int, default=8, help="rank form: rank per chunk and head")
  ap.add_argument("--hier_window", type=int, default=2,
                  help="hierarchical cache of the full model: recent blocks kept whole")
  ap.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
  ap.add_argument("--rerender", action="store_true", help="only rewrite md/png from JSON")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "long_context_retrieval"))
  args = ap.parse_args(argv)
  if args.rerender:
    return args
  if args.quick:
    args.steps, args.ext_steps, args.lengths = 4, 2, "256,1024"
    args.depths, args.per_cell, args.runs = "0.5", 1, args.runs + "_quick"
    if args.out == ap.get_default("out"):
      # A smoke run, not a result.
      args.out = os.path.join(tempfile.gettempdir(), "long_context_retrieval_quick")
  args.model_list = [m for m in args.models.split(",") if m]
  if (not args.model_list or set(args.model_list) - {"full", "summary"}
      or len(set(args.model_list)) != len(args.model_list)):
    ap.error(f"--models={args.models!r}: full and/or summary, each once")
  for flag, low in (("steps", 1), ("ext_steps", 0), ("ext_factor", 1), ("eval_factor", 1),
                    ("per_cell", 1), ("num_pairs", 1), ("max_new_tokens", 1),
                    ("batch_size", 1), ("chunk", 1), ("rank", 1), ("hier_window", 1),
                    ("slots", 0)):
    if getattr(args, flag) < low:
      ap.error(f"--{flag}={getattr(args, flag)} must be >= {low}")
  args.length_list = numbers(ap, args, "lengths", int, lambda n: n >= 1, "integers >= 1")
  args.depth_list = numbers(ap, args, "depths", float, lambda d: 0.0 <= d <= 1.0,
                             "numbers in [0, 1]")
  if not 0 <= args.curriculum_steps < args.steps:
    ap.error(f"--curriculum_steps={args.curriculum_steps} must be in [0, --steps={args.steps})")
  try:
    tasks_lib.DepthCurriculum.parse(args.curriculum_steps, args.curriculum_depths,
                                    args.curriculum, args.curriculum_hold)
  except ValueError as e:
    ap.error(f"--curriculum_depths={args.curriculum_depths!r}, --curriculum={args.curriculum}, "
             f"--curriculum_hold={args.curriculum_hold}: {e}")
  args.task_list = args.tasks.split(",")
  if not set(args.task_list) <= set(tasks_lib.TASKS) or len(set(args.task_list)) != len(
      args.task_list):
    ap.error(f"--tasks={args.tasks!r}: each once, of {list(tasks_lib.TASKS)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.rerender:
    with open(args.out + ".json", encoding="utf-8") as f:
      write(json.load(f), args.out)
    return
  import blockdiff_jax.data.tokenizers as tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.ByteTokenizer()
  try:  # Before training: a length too short for a task fails here, not after an hour.
    examples = tasks_lib.make_suite(tok, lengths=args.length_list, depths=args.depth_list,
                                    per_cell=args.per_cell, tasks=args.task_list,
                                    num_pairs=args.num_pairs)
  except ValueError as e:
    raise SystemExit(f"--lengths={args.lengths!r} --tasks={args.tasks!r} "
                     f"--num_pairs={args.num_pairs}: {e}") from None
  os.makedirs(args.runs, exist_ok=True)
  t0 = time.time()
  models = args.model_list
  train_seconds = train(args.runs, args.steps, args.ext_factor, args.ext_steps, args.slots,
                        models, args.train_tasks,
                        [o for o in args.train_overrides.split(",") if o],
                        curriculum_overrides(args))
  evaluated = variants(args.ext_factor, args.eval_factor, models, args.ext_steps > 0)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": " ".join(["python", "experiments/long_context_retrieval.py"]
                                + sys.argv[1:]),
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("out", "model_list", "length_list", "depth_list",
                                      "task_list")},
            "train_seconds": train_seconds, "seconds": 0.0,
            "lineage": {m: lineage(os.path.join(args.runs, m), args.eval_step)
                        for m in models},
            "windows": {m: checkpoints.load_config(os.path.join(args.runs, m))
                        .model.summary.window_blocks for m in models},
            # From each run's config, not the flags: a run trained before is not retrained.
            "curricula": {m: trained_curriculum(os.path.join(args.runs, m)) for m in models},
            "train_lengths": train_lengths(args.runs, models, args.ext_factor,
                                           args.ext_steps),
            "variants": [dataclasses.asdict(v) for v in evaluated],
            "errors": {}, "rows": []}
  for v in evaluated:
    print(f"evaluating {v} on {len(examples)} prompts ...", flush=True)
    # One variant failing (a cache form the model lacks, an OOM at 4k) is an error line of
    # the results, not the loss of every variant evaluated after the training.
    try:
      result["rows"] += evaluate(args.runs, v, examples, args)
    except Exception as e:  # pylint: disable=broad-except
      result["errors"][v.name] = f"{type(e).__name__}: {e}"
      print(f"  {v.name}: failed ({result['errors'][v.name]})", file=sys.stderr, flush=True)
    result["seconds"] = time.time() - t0
    write(result, args.out)  # A killed run keeps the variants it evaluated.
  if result["errors"]:
    sys.exit(f"{len(result['errors'])} of {len(evaluated)} variants failed (listed under "
             "errors in the results)")


def curriculum_overrides(args) -> list[str]:
  """The source models' ``data.long_context_curriculum*`` fields (none without one)."""
  if not args.curriculum_steps:
    return []
  return [f"data.long_context_curriculum_steps={args.curriculum_steps}",
          f"data.long_context_curriculum_depths={args.curriculum_depths}",
          f"data.long_context_curriculum={args.curriculum}",
          f"data.long_context_curriculum_hold={args.curriculum_hold}"]


def trained_curriculum(workdir: str) -> dict | None:
  """The needle-depth curriculum ``workdir`` was trained with (None: none, or a run
  from before the fields existed)."""
  config = checkpoints.load_config(workdir)
  d = config.data
  steps = d.get("long_context_curriculum_steps", 0)
  return ({"steps": steps, "depths": d.get("long_context_curriculum_depths", "0,0.05"),
           "kind": d.get("long_context_curriculum", "switch"),
           "hold": d.get("long_context_curriculum_hold", 0),
           "run_steps": config.train.steps} if steps else None)


def train_lengths(runs: str, models: Sequence[str], ext_factor: int, ext_steps: int) -> dict:
  """data.seq_len each trained workdir (source models, then extensions) was trained at."""
  names = list(models) + ([f"{m}_x{ext_factor}" for m in models] if ext_steps else [])
  return {n: checkpoints.load_config(os.path.join(runs, n)).data.seq_len for n in names
          if os.path.isdir(os.path.join(runs, n))}


def _source_length(result) -> int:
  """Training length of the source models (256 in files written before it was recorded)."""
  lens = result.get("train_lengths", {})
  return max([v for k, v in lens.items() if "_x" not in k] or [256])


def _cell(x: float) -> str:
  """A rate with two decimals; ``-`` for NaN (no prompt in that cell)."""
  return "-" if math.isnan(x) else f"{x:.2f}"


def write(result, out):
  """``out``.json (strict: NaN is null), .md and .png of what ``result`` holds so far.

  A cell no prompt was scored in (a failed variant, one not evaluated yet) is ``-``.
  """
  os.makedirs(os.path.dirname(out), exist_ok=True)
  # Replaced whole: a kill while writing in place lost every variant evaluated before.
  with open(out + ".json.tmp", "w", encoding="utf-8") as f:
    json.dump(metrics_writer.finite_or_none(result), f, indent=2, allow_nan=False)
  os.replace(out + ".json.tmp", out + ".json")
  rows, st = result["rows"], result["settings"]
  errors = result.get("errors", {})
  scored = {r["variant"] for r in rows}
  # Variants not scored yet, and failed ones, have no rows: left out of the tables.
  names = [v["name"] for v in result["variants"] if v["name"] in scored]
  if not names:
    lines = ["# Passkey / KV recall: no variant scored", ""] + [
        f"- {k}: {e}" for k, e in errors.items()]
    with open(out + ".md", "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    return
  lengths = sorted({r["length"] for r in rows})
  train_len = _source_length(result)
  ext_len = max([v for k, v in result.get("train_lengths", {}).items() if "_x" in k]
                or [train_len * st["ext_factor"]])
  lines = [f"# Passkey / KV recall, trained at {train_len} tokens, evaluated to {max(lengths)} "
           f"({result['device']}, jax {result['jax']})", "",
           f"Command: `{result['command']}` ({result['seconds'] / 60:.1f} min in all"
           + ("; training runs in minutes: " + ", ".join(
               f"{k} {v / 60:.1f}" for k, v in result["train_seconds"].items())
              if result["train_seconds"] else "; no training: the runs existed")
           + ").", "",
           f"Models: configs/long_context_retrieval.py at {train_len} tokens ("
           + "; ".join(result.get("lineage", {"steps": f"{st['steps']} steps"}).values())
           + f"); `summary` has {st['slots']} summary slots per 16-token block and reads the "
           f"last {result.get('windows', {}).get('summary', 2)} blocks in full. "
           + (f"`ext{st['ext_factor']}`: YaRN x{st['ext_factor']} and {st['ext_steps']} "
              f"fine-tuning steps at {ext_len} tokens (configs/long_context_extension.py). "
              if st["ext_steps"] else "")
           + f"`yarn{st['eval_factor']}`: YaRN "
           f"x{st['eval_factor']} at evaluation only. `hier`: the hierarchical cache, "
           f"window {st.get('hier_window', 2)}, chunk {st['chunk']}, rank {st['rank']}, 1 sink chunk; the summary "
           "model always decodes with the summary-form cache (exact for it). Block "
           "decoder, one token per step, prompts `BOS prompt SEP`; "
           f"{st['per_cell']} prompts per (task, length, depth), depths {st['depths']}."]
  for model, cur in result.get("curricula", {}).items():
    if cur:
      band = ("then [0, 1]" if cur["kind"] == "switch" else
              f"holding them for {cur['hold']}, then widening to [0, 1]" if cur.get("hold")
              else "widening to [0, 1] over them")
      if cur["steps"] >= cur.get("run_steps", cur["steps"] + 1):  # Never past the band.
        span = f"all its {cur['run_steps']} steps" + (", widening" if cur["kind"] == "widen"
                                                      else "")
      else:
        span = f"its first {cur['steps']} steps, {band}"
      lines[-1] += (f" `{model}` was trained with needles at depths {cur['depths']} for "
                    f"{span} (curriculum '{cur['kind']}').")

  def table(title, columns, cell):
    """A Markdown table: one row per variant, ``cell(variant, column)`` in each column."""
    lines.extend(["", f"## {title}", "", "| variant | " + " | ".join(map(str, columns))
                  + " |", "|---|" + "---|" * len(columns)]
                 + [f"| {v} | " + " | ".join(_cell(cell(v, c)) for c in columns) + " |"
                    for v in names])

  rate = lambda **w: long_context.accuracy(rows, **w)[0]
  table("Exact match by prompt length (all tasks)", lengths,
        lambda v, n: rate(variant=v, length=n))
  for task in sorted({r["task"] for r in rows}):
    table(task, lengths, lambda v, n, task=task: rate(variant=v, length=n, task=task))
  table("Answer characters right, in place (partial retrieval; all tasks)", lengths,
        lambda v, n: long_context.char_rate(rows, variant=v, length=n))
  for task in sorted({r["task"] for r in rows}):
    per_variant = {v: long_context.char_position_rates(rows, variant=v, task=task)
                   for v in names}
    width = max(len(p) for p in per_variant.values())
    table(f"{task}: answer character right, by position in the answer (all lengths)",
          list(range(1, width + 1)),
          lambda v, k, p=per_variant: p[v][k - 1] if k <= len(p[v]) else float("nan"))
  table("By needle depth (all tasks and lengths)", sorted({r["depth"] for r in rows}),
        lambda v, d: rate(variant=v, depth=d))
  n = long_context.accuracy(rows, variant=names[0], length=lengths[0])[1]
  lines += ["", f"Each cell of the length tables is {n} prompts (binomial standard error "
            f"up to {0.5 / max(n, 1) ** 0.5:.2f})."]
  if errors:
    lines += ["", "## Variants that failed (no rows)", ""] + [
        f"- {k}: {(e.splitlines() or [''])[0]}" for k, e in errors.items()]
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    plot(result, names, out + ".png")
  except ImportError:
    print("matplotlib missing: no plot")


def plot(result, names, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result["rows"]
  tasks = sorted({r["task"] for r in rows})
  lengths = sorted({r["length"] for r in rows})
  train_len = _source_length(result)
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for v in names:
      style = "--" if v.startswith("summary") else "-"
      ax.semilogx(lengths, [long_context.accuracy(rows, variant=v, task=task, length=n)[0]
                            for n in lengths], "o" + style, label=v, base=2)
    ax.axvline(train_len, color="gray", lw=0.8)
    ax.set(xlabel=f"prompt length (tokens; trained at <= {train_len})", ylabel="exact match",
           title=task, ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)  # Written after every variant: an open figure each time adds up.


if __name__ == "__main__":
  main()
