"""I-DLM on SmolLM2: TPF and speed-up against AR at several strides, per fine-tuning time.

For each checkpoint of an introspective run (``configs/smollm2_idlm.py``) and for the
model before training (gated adapters at zero: the base model's MASK-slot guesses),
decodes the config's prompts by greedy AR and by greedy ISD at every stride, each
prompt alone and warm (``sampling/speedup.py``), and reports whether ISD's text equals
AR's (it must: lossless), the TPF and the tokens/s ratio. Minutes of fine-tuning come
from the run's own step times (``metrics.jsonl``).

  python -m blockdiff_jax.main --config=configs/smollm2_idlm.py --workdir=runs/idlm --mode=distill
  python -m blockdiff_jax.main --config=configs/smollm2_idlm.py --workdir=runs/idlm \
      --config.train.steps=110 --config.train.checkpoint_every=5 --config.train.keep_checkpoints=30
  python experiments/idlm_smollm2.py --workdir=runs/idlm --minutes=1,5,20

Writes experiments/results/idlm_smollm2{_tag}.{json,md,png}.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax

from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.sampling import sample
from blockdiff_jax.sampling import speedup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def distilled_prompts(workdir: str, config, n: int) -> list[str]:
  """The first ``n`` training questions of the run, rendered as training rendered them."""
  _, _, tok, _ = inference.load_for_inference(tempfile.mkdtemp(), config)
  with open(os.path.join(workdir, "distill", "answers.jsonl")) as f:
    questions = [json.loads(line)["prompt"] for line in f][:n]
  return [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]


def minutes_per_step(workdir: str) -> dict[int, float]:
  """Cumulative training minutes at each logged step (from metrics.jsonl step times)."""
  return {s: sec / 60.0 for s, sec in step_timing(read_metrics(workdir))[1].items()}


def read_metrics(workdir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl (an absent file: none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return metrics_writer.read_rows(path)  # NaN / Infinity restored from their nulls.


def step_timing(rows: list[dict]) -> tuple[float | None, dict[int, float]]:
  """(median seconds per step, summed logged seconds at each logged step).

  A logged ``step_time_s`` is the mean over the steps since the previous log, so the sum
  weighs it by that many steps. A resumed run logs its steps again from the resume point:
  the latest row for a step wins.
  """
  latest = {}
  for r in rows:
    if "step_time_s" in r:
      latest[int(r["step"])] = float(r["step_time_s"])
  if not latest:
    return None, {}
  cumulative, total, prev = {}, 0.0, 0
  for step in sorted(latest):
    total += latest[step] * (step - prev)
    cumulative[step], prev = total, step
  return statistics.median(latest.values()), cumulative


def pick_steps(available: list[int], minutes: dict[int, float], want: list[float]):
  """For each wanted minute mark, the saved step whose training time is closest."""
  if not minutes:
    return [(s, float("nan")) for s in available]
  logged = sorted(minutes)
  def at(step):  # Interpolate between logged steps.
    prev = max([s for s in logged if s <= step], default=0)
    nxt = min([s for s in logged if s >= step], default=logged[-1])
    m0, m1 = minutes.get(prev, 0.0), minutes[nxt]
    return m0 if nxt == prev else m0 + (m1 - m0) * (step - prev) / (nxt - prev)
  picks = []
  for w in want:
    step = min(available, key=lambda s: abs(at(s) - w))
    if step not in [p[0] for p in picks]:
      picks.append((step, at(step)))
  return picks


def checkpoint_steps(workdir: str) -> list[int]:
  """The saved steps of ``workdir``'s run, sorted.

  Raises:
    ValueError: there are none, naming --workdir (``pick_steps`` ended in ``min()`` of an
      empty sequence, or, with no step times logged, a base-only table replaced the
      real results).
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                 if n.isdigit())
  if not steps:
    raise ValueError(f"--workdir={workdir!r}: no checkpoints in {ckpt_dir}")
  return steps


def md_cell(text: str) -> str:
  """``text`` as one Markdown table cell: a '|' or a newline would break the row."""
  return " ".join(str(text).split()).replace("|", "\\|")


def parse_flags(args) -> tuple[list[int], list[float]]:
  """(strides, minutes) of the flags, refused by name before any model is loaded.

  Raises:
    ValueError: an entry that is no number, a stride below 2 (ISD's least), a repeat.
  """
  def numbers(flag, text, cast):
    try:
      values = [cast(x) for x in text.split(",")]
    except ValueError:
      raise ValueError(f"--{flag}={text!r}: comma-separated numbers expected") from None
    if len(set(values)) != len(values):
      raise ValueError(f"--{flag}={text!r} repeats a value")
    return values
  strides = numbers("strides", args.strides, int)
  if min(strides) < 2:
    raise ValueError(f"--strides={args.strides!r}: ISD needs strides >= 2")
  minutes = numbers("minutes", args.minutes, float)
  if not all(m >= 0 and m == m for m in minutes):
    raise ValueError(f"--minutes={args.minutes!r}: minutes must be >= 0")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
  return strides, minutes


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(_HERE, "..", "configs", "smollm2_idlm.py"))
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--minutes", default="1,5,20", help="fine-tuning minutes to evaluate")
  ap.add_argument("--strides", default="2,3,4,6,8")
  ap.add_argument("--max_new_tokens", type=int, default=48)
  ap.add_argument("--no_base", action="store_true", help="skip the untrained row")
  ap.add_argument("--quick", action="store_true", help="1 prompt, 8 tokens, strides 2,4")
  ap.add_argument("--tag", default="")
  ap.add_argument("--prompts_from", default="config", choices=("config", "distilled"),
                  help="config: the sample prompts (held out from training); distilled: "
                  "the first questions the drafter was trained on (<workdir>/distill)")
  ap.add_argument("--num_prompts", type=int, default=3, help="with --prompts_from=distilled")
  args = ap.parse_args()
  try:
    strides, wanted = parse_flags(args)
    available = checkpoint_steps(args.workdir)
  except ValueError as e:
    ap.error(str(e))
  config = _load_config(args.config)
  s = config.sample
  prompts = sample.read_prompts(s)
  if args.prompts_from == "distilled":
    prompts = distilled_prompts(args.workdir, config, args.num_prompts)
  max_new = args.max_new_tokens
  if args.quick:
    prompts, strides, max_new = prompts[:1], [2, 4], 8
  minutes = minutes_per_step(args.workdir)
  picks = pick_steps(available, minutes, wanted)
  if not args.no_base:
    picks = [(None, 0.0)] + picks
  results, t_start, failed = [], time.time(), 0
  for step, mins in picks:
    try:
      if step is None:  # No checkpoint: init.pretrained weights + fresh (zero) adapters.
        cfg, model, tok, params = inference.load_for_inference(tempfile.mkdtemp(), config)
      else:
        cfg, model, tok, params = inference.load_for_inference(args.workdir, config, step=step)
      opts = sample.options_from_config(s, cfg.diffusion.block_size, tok, True)
    except Exception as e:  # pylint: disable=broad-except
      loaded = None
      error = f"{type(e).__name__}: {e}"
    else:
      loaded = (model, params, tok, opts, s.max_len or cfg.data.seq_len)
    for n in strides:
      # One failing cell (out of memory, an XLA error) is an error row; the others run.
      try:
        if loaded is None:
          raise RuntimeError(f"loading failed: {error}")
        model, params, tok, opts, max_len = loaded
        rows, summ = speedup.compare_with_ar(model, params, tok, prompts, opts, max_new,
                                             max_len, speedup.Decoder("isd", n))
        row = {"step": step or 0, "minutes": mins, "stride": n, **summ, "rows": rows}
        print(f"step {step or 0} ({mins:.1f} min) N={n}: TPF {summ['tpf']:.2f}, "
              f"{summ['speedup']:.2f}x AR, identical {summ['identical']} "
              f"[{time.time() - t_start:.0f} s]", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        failed += 1
        row = {"step": step or 0, "minutes": mins, "stride": n,
               "error": e.args[0] if loaded is None else f"{type(e).__name__}: {e}"}
        print(f"step {step or 0} N={n}: {row['error']}", flush=True)
      results.append(row)
      # A killed run keeps what it measured.
      write(results, args, prompts, max_new, final=False)
  write(results, args, prompts, max_new)
  if failed:
    sys.exit(f"{failed} of {len(results)} cells failed (error rows in the results)")


def write(results, args, prompts, max_new, final=True):
  name = "idlm_smollm2" + (f"_{args.tag}" if args.tag else "")
  # A --quick smoke run is not a result: under its name it would replace the real one.
  quick = getattr(args, "quick", False)
  out_dir = tempfile.gettempdir() if quick else os.path.join(_HERE, "results")
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name + ("_quick" if quick else ""))
  env = {"backend": jax.default_backend(), "jax": jax.__version__, "cpus": os.cpu_count(),
         "machine": platform.machine(), "load_avg": os.getloadavg(),
         "command": " ".join(["experiments/idlm_smollm2.py"] + sys.argv[1:]),
         "prompts_from": args.prompts_from}
  with open(base + ".json", "w", encoding="utf-8") as f:  # Strict: minutes may be NaN.
    json.dump(metrics_writer.finite_or_none({"env": env, "prompts": prompts,
                                             "max_new_tokens": max_new, "results": results}),
              f, indent=2, allow_nan=False)
  lines = ["# I-DLM on SmolLM2-135M-Instruct: ISD against AR by fine-tuning time\n",
           f"`{env['command']}` on {env['backend']} ({env['cpus']} CPUs), jax {env['jax']}, "
           f"load average {env['load_avg'][0]:.1f}; {len(prompts)} prompts "
           f"({'the config sample prompts, held out from training' if args.prompts_from == 'config' else 'questions the drafter was trained on'}), "
           f"up to {max_new} new tokens, batch 1, greedy, warm (compilation excluded).\n",
           "| fine-tuning (min) | step | N | TPF | ISD tok/s | AR tok/s | speed-up | identical to AR |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    mins = "-" if r["minutes"] != r["minutes"] else f"{r['minutes']:.1f}"  # NaN: no log.
    if "error" in r:
      lines.append(f"| {mins} | {r['step']} | {r['stride']} | not run: {md_cell(r['error'])} "
                   "| | | | |")
      continue
    lines.append(f"| {mins} | {r['step']} | {r['stride']} | {r['tpf']:.2f} | "
                 f"{r['tokens_per_s']:.1f} | {r['ar_tokens_per_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {r['identical']} |")
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  if final:  # The figure once, at the end; the JSON and table after every cell.
    try:
      plot(results, base + ".png")
    except ImportError:
      pass
  print(f"wrote {base}.json/.md" + (".png" if final else ""))


def plot(results: list[dict], path: str) -> None:
  """TPF and speed-up against the stride, one curve per checkpoint (error rows left out)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for step in sorted({r["step"] for r in results}):
    rs = [r for r in results if r["step"] == step and "error" not in r]
    if not rs:
      continue
    label = f"{rs[0]['minutes']:.0f} min" if step else "untrained"
    axes[0].plot([r["stride"] for r in rs], [r["tpf"] for r in rs], "o-", label=label)
    axes[1].plot([r["stride"] for r in rs], [r["speedup"] for r in rs], "o-", label=label)
  axes[0].set(xlabel="stride N", ylabel="tokens per forward")
  axes[1].set(xlabel="stride N", ylabel="speed-up vs AR (tokens/s)")
  axes[1].axhline(1.0, color="gray", lw=0.5)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


if __name__ == "__main__":
  main()
