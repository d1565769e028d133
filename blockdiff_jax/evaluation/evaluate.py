r"""``--mode=eval``: the tasks of ``config.eval`` on a trained workdir.

  python -m blockdiff_jax.main --config=configs/quickstart.py --workdir=runs/quickstart \
      --mode=eval --config.eval.tasks=likelihood,throughput

Tasks (comma-separated in ``eval.tasks``):
  likelihood           NELBO ± standard error and bits/byte on the validation split.
  synthetic            exact match on the synthetic tasks, per decoder.
  humaneval            pass@k on HumanEval's problems, completions from each decoder.
  humaneval_infilling  HumanEval-infilling (single-/multi-line spans of the canonical
                       solutions), filled by the in-place infilling decoder with the
                       reference span length, or by FIM prompting (``infilling_mode``).
  long_context         passkey / key-value recall exact match per prompt length and
                       needle depth (data/long_context.py), per decoder, with the
                       ``sample`` section's KV cache (full or hierarchical).
  throughput           NFE, TPF, generated tokens/s, steps per block and latency per
                       decoder, and unique experts per layer per forward with token
                       routing vs dMoE block routing on the same weights.

Decoders (``eval.decoders``): ``policy:value`` items such as ``threshold:0.9``,
``topk:2`` or ``entropy:0.5``, and ``ar`` for the autoregressive baseline. Results go
to ``WORKDIR/eval/eval_<time>.json`` and ``.md`` (``_1``, ``_2``, ... rather than
overwrite an earlier run's) and into ``metrics.jsonl``. A task that raises is recorded
as ``{"error": ...}`` next to what it measured before (earlier decoders), the others
still run, and the command fails after writing. ``sample.seed`` sets the sampling keys.
"""

import dataclasses
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import long_context as long_context_data
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import synthetic
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.evaluation import eval_config
from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import long_context as long_context_eval
from blockdiff_jax.evaluation import sandbox
from blockdiff_jax import metrics_writer
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample as sample_lib


def _split(spec: str) -> list[str]:
  """The items of a comma-separated config field, stripped, blank ones skipped.

  Every list field reads alike: ``"passkey, kv_recall"`` names two tasks, as
  ``"likelihood, throughput"`` does in ``eval.tasks``.
  """
  return [s.strip() for s in spec.split(",") if s.strip()]


def _parse_decoders(spec: str, warn: bool = False) -> list[tuple[str, float | None]]:
  """``eval.decoders`` as (policy, value) pairs, each checked as the decoder will build it.

  Checked here, before the model loads: a typo'd policy or an out-of-range value would
  otherwise fail every decoding task only once each one runs. A decoder named twice
  ("threshold:0.9,threshold:0.90") decodes once, as a task named twice in ``eval.tasks``
  runs once (``warn``: say so, once per run); two different values that report under one
  name are refused.
  """
  out = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    if item == "ar":
      out.append(("ar", None))
      continue
    name, _, text = item.partition(":")
    try:
      value = float(text) if text else None
    except ValueError:
      raise ValueError(f"eval.decoders: {item!r} needs a number after ':' "
                       f"(policy:value), in {spec!r}") from None
    # A NaN passes a range check written as "not value < low" (entropy:nan and
    # factor:nan were accepted); inf is a real setting (entropy:inf: no budget).
    if value is not None and math.isnan(value):
      raise ValueError(f"eval.decoders: {item!r} needs a number after ':', not NaN, "
                       f"in {spec!r}")
    if name not in policies.POLICIES:
      raise ValueError(f"eval.decoders: unknown policy {name!r} in {spec!r}; choose from "
                       f"{sorted(policies.POLICIES)} or 'ar'")
    try:
      policies.make_policy(name, value)
    except ValueError as e:
      raise ValueError(f"eval.decoders: {item!r} is out of range: {e}") from None
    out.append((name, value))
  if not out:
    raise ValueError(f"eval.decoders is empty: {spec!r}")
  # A decoder named twice ("threshold:0.9,threshold:0.90") would decode every task twice
  # and keep only its second result under the one name.
  unique = list(dict.fromkeys(out))
  if warn and len(unique) < len(out):
    twice = next(d for i, d in enumerate(out) if d in out[:i])
    print(f"eval: eval.decoders names {_decoder_name(*twice)} more than once ({spec!r}); "
          f"each decoder runs once", flush=True)
  # Results are keyed by the name, which keeps 6 digits: threshold:0.9000001 decoded
  # after threshold:0.9 overwrote its results under "threshold:0.9".
  names: dict[str, tuple[str, float | None]] = {}
  for d in unique:
    other = names.setdefault(_decoder_name(*d), d)
    if other != d:
      raise ValueError(f"eval.decoders: {d[0]}:{d[1]!r} and {other[0]}:{other[1]!r} both "
                       f"report as {_decoder_name(*d)!r}, in {spec!r}; give values that "
                       f"differ in their first 6 digits")
  return unique


def _decoder_name(policy: str, value: float | None) -> str:
  return policy if value is None else f"{policy}:{value:g}"


@dataclasses.dataclass
class Evaluator:
  """A loaded model plus the decoding settings shared by the tasks."""

  config: ml_collections.ConfigDict
  model: transformer.Transformer
  tokenizer: Any
  params: Any
  workdir: str | None = None  # The run's folder (sft_source="distilled" reads it).
  partial: dict | None = None  # The running task's results so far (``_track``).

  def options(self, policy: str, value: float | None):
    s = ml_collections.ConfigDict(self.config.sample.to_dict())
    s.policy, s.policy_value = policy, (value if value is not None else s.policy_value)
    # token_shift is the model's: a shifted model decoded unshifted reads every logit
    # one position off.
    return sample_lib.options_from_config(s, self.config.diffusion.block_size, self.tokenizer,
                                          self.config.diffusion.get("token_shift", False))

  def key(self, index: int):
    """The sampling key of the batch starting at prompt ``index``, under ``sample.seed``.

    Another seed draws other samples (a second pass@k estimate); one seed, the same ones.
    """
    return jax.random.fold_in(jax.random.key(self.config.sample.get("seed", 0)), index)

  def generate(self, prompts: Sequence[str], policy: str, value: float | None,
               max_new_tokens: int, max_len: int, batch_size: int, model=None,
               warmup: bool = True, first_index: int = 0) -> tuple[list[dict], dict]:
    """Decodes prompts in fixed-size batches (one compile); returns rows and a summary.

    A prompt that does not fit ``max_len`` with ``max_new_tokens`` gets an empty
    completion and an ``error`` instead of stopping the run.

    Args:
      first_index: the index of ``prompts[0]`` among all the prompts of a task decoded
        in several calls. Each batch's sampling key is its first prompt's index, so
        calls never reuse a key (``key``), and only the first call warms up.
    """
    rows: list[dict | None] = [None] * len(prompts)
    fits = []
    for i, p in enumerate(prompts):
      n = len(layout.parse(self.tokenizer, p).ids)
      if n + max_new_tokens > max_len:
        rows[i] = {"completion": "", "error": f"prompt has {n} tokens; with max_new_tokens="
                   f"{max_new_tokens} it exceeds the context of {max_len}",
                   "generated_tokens": 0, "nfe": 0, "steps_per_block": []}
      else:
        fits.append(i)
    wall, n_gen, nfe, unique = 0.0, 0, 0, []
    options = self.options(policy, value)
    b = options.block_size
    width = -(-max_len // b) * b  # The canvas is whole blocks; max_len stays the limit.
    for start in range(0, len(fits), batch_size):
      idx = fits[start:start + batch_size]
      chunk = [prompts[i] for i in idx]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      out, summary = sample_lib.generate(
          model or self.model, self.params, self.tokenizer, padded, options, max_new_tokens,
          max_len, width=width, ar=policy == "ar", rng=self.key(first_index + idx[0]),
          warmup=warmup and first_index == 0 and start == 0)
      for i, r in zip(idx, out):
        rows[i] = r
      wall += summary["wall_s"]
      n_gen += sum(r["generated_tokens"] for r in out[:len(chunk)])
      nfe += sum(r["nfe"] for r in out[:len(chunk)])
      unique.append(summary["unique_experts"])
    steps = [s for r in rows for s in r["steps_per_block"]]
    batches = -(-len(fits) // batch_size)
    return rows, {
        "decoder": _decoder_name(policy, value), "sequences": len(rows),
        "too_long": len(prompts) - len(fits),
        "generated_tokens": n_gen, "nfe": nfe, "tpf": n_gen / max(nfe, 1),
        "tokens_per_s": n_gen / wall if wall else float("nan"),
        # Per decoded batch: prompts too long for max_len were never decoded.
        "latency_s_per_batch": wall / batches if batches else float("nan"),
        "mean_steps_per_block": float(np.mean(steps)) if steps else float("nan"),
        "unique_experts_per_layer": (float(np.mean(unique))
                                     if unique and np.isfinite(unique).all() else float("nan")),
    }


def _track(ev, out: dict) -> dict:
  """Registers ``out`` as the running task's results (``ev.partial``) and returns it: if a
  later decoder raises, ``run`` writes what earlier ones measured next to the error."""
  ev.partial = out
  return out


def synthetic_prompts(config, tokenizer, n: int) -> tuple[list[str], list[str], list[str]]:
  """(tasks, raw prompts, decoder prompts) of the first ``n`` synthetic validation examples.

  A decoder prompt is the head the ``synthetic`` SFT source trains on (``sft.render``): the
  chat template's user turn for a tokenizer with one (a pretrained model), else
  ``<|bos|>prompt<|sep|>``. A chat model asked in the bare form sees a prompt it was never
  fine-tuned on.
  """
  tasks = synthetic.parse_tasks(config.data.synthetic_tasks)
  items = [synthetic.mixed_example(tasks, config.data.seed, i, split="validation",
                                   digits=config.data.synthetic_digits) for i in range(n)]
  if hasattr(tokenizer, "apply_chat_template"):
    head = lambda p: tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   add_generation_prompt=True)
  else:
    head = lambda p: f"<|bos|>{p}<|sep|>"
  return ([t for t, _, _ in items], [p for _, p, _ in items],
          [head(p) for _, p, _ in items])


def task_likelihood(ev: Evaluator) -> dict:
  c = ev.config
  ds = pipeline.build_dataset(c.data, ev.tokenizer, "validation", c.data.seq_len,
                              c.data.batch_size, c.seed, ev.workdir)
  apply_fn = build.make_apply(ev.model)
  obj = diffusion_config.objective(c, ev.tokenizer.mask_id)
  res = likelihood.evaluate(apply_fn, ev.params, ds, obj, c.eval.likelihood_batches,
                            c.eval.noise_samples, c.seed, progress=sys.stdout,
                            special_ids=ev.tokenizer.special_ids)
  res["unigram_entropy_bits_per_token"] = ds.unigram_entropy_bits
  return res


def _synthetic_context(ev: Evaluator, prompts: Sequence[str]) -> int:
  """sample.max_len (or data.seq_len), widened to the longest prompt plus its answer.

  Validation prompts can be longer than the training rows leave room for
  (``synthetic.py``: up to 38 tokens before 32 new ones in rows of 64).
  """
  c = ev.config
  longest = max(len(layout.parse(ev.tokenizer, p).ids) for p in prompts)
  b = c.diffusion.block_size
  return max(c.sample.max_len or c.data.seq_len,
             -(-(longest + c.sample.max_new_tokens) // b) * b)


def task_synthetic(ev: Evaluator) -> dict:
  c = ev.config
  tasks, raw, prompts = synthetic_prompts(c, ev.tokenizer, c.eval.num_examples)
  out = _track(ev, {})
  for policy, value in _parse_decoders(c.eval.decoders):
    rows, summary = ev.generate(prompts, policy, value, c.sample.max_new_tokens,
                                _synthetic_context(ev, prompts), c.eval.batch_size)
    ok = [synthetic.check(t, p, r["completion"]) for t, p, r in zip(tasks, raw, rows)]
    # Sorted: a set of strings iterates in an order that changes with the hash seed.
    by_task = {t: float(np.mean([o for tt, o in zip(tasks, ok) if tt == t]))
               for t in sorted(set(tasks))}
    out[summary["decoder"]] = {"exact_match": float(np.mean(ok)), "by_task": by_task,
                               "tpf": summary["tpf"], "tokens_per_s": summary["tokens_per_s"]}
  return out


def _limits(c) -> sandbox.SandboxLimits:
  return dataclasses.replace(humaneval.DEFAULT_LIMITS, timeout_s=c.eval.timeout_s)


def task_humaneval(ev: Evaluator) -> dict:
  c = ev.config
  problems = dict(list(humaneval.load_problems().items())[:c.eval.humaneval_problems])
  ks = eval_config.int_list(c.eval, "ks")  # As validated: blank items are skipped.
  out = _track(ev, {})
  for policy, value in _parse_decoders(c.eval.decoders):
    done, too_long = [0], []

    def generate_fn(prompts, policy=policy, value=value, done=done, too_long=too_long):
      # generate_and_score calls this once per batch: first_index keeps the samples of
      # one problem from sharing a sampling key across calls.
      rows, _ = ev.generate([f"<|bos|>{p}" for p in prompts], policy, value,
                            c.eval.max_new_tokens, c.eval.max_len, c.eval.batch_size,
                            first_index=done[0])
      done[0] += len(prompts)
      too_long.extend(r["error"] for r in rows if "error" in r)
      return [r["completion"] for r in rows]
    res = humaneval.generate_and_score(
        generate_fn, problems, num_samples=c.eval.samples_per_problem,
        batch_size=c.eval.batch_size, ks=ks, workers=c.eval.workers, limits=_limits(c))
    if too_long:  # Scored as failures (empty completions); said, not silent.
      print(f"eval: humaneval: {len(too_long)} sample(s) not decoded: {too_long[0]} "
            f"(raise eval.max_len)", flush=True)
    out[_decoder_name(policy, value)] = {
        "pass_at_k": res["pass_at_k"], "num_problems": res["num_problems"],
        "temperature": c.sample.get("temperature", 0.0),
        "status_counts": res["status_counts"], "prompts_too_long": len(too_long)}
  return out


def task_humaneval_infilling(ev: Evaluator) -> dict:
  c = ev.config
  problems = dict(list(humaneval.load_problems().items())[:c.eval.humaneval_problems])
  kinds = tuple(k.strip() for k in c.eval.infilling_kinds.split(",") if k.strip())
  tasks = infilling.make_tasks(problems, infilling.InfillOptions(kinds=kinds))
  policy, value = next((d for d in _parse_decoders(c.eval.decoders) if d[0] != "ar"),
                       ("threshold", 0.9))
  middles = []
  if c.eval.infilling_mode == "inplace":
    options = ev.options(policy, value)
    b = options.block_size
    width = -(-c.eval.max_len // b) * b
    texts = [f"<|bos|>{t.prefix}<|mask:{len(ev.tokenizer.encode(t.middle))}|>{t.suffix}"
             for t in tasks]
    fits = []
    for i, text in enumerate(texts):
      try:
        layout.infill_canvas([layout.parse(ev.tokenizer, text)], b, c.eval.max_len)
        fits.append(i)
      except ValueError as e:  # Too long for eval.max_len: scored as a failure.
        print(f"eval: humaneval_infilling: task {i} not decoded: {e}", flush=True)
    middles = [""] * len(tasks)
    # Spans are decoded with their specials: the EOS padding of a short fill is the
    # tokenizer's own EOS text ("<|endoftext|>" for a pretrained one), not "<|eos|>".
    eos = ev.tokenizer.decode([ev.tokenizer.eos_id], skip_special=False)
    for start in range(0, len(fits), c.eval.batch_size):
      idx = fits[start:start + c.eval.batch_size]
      res = sample_lib.infill(ev.model, ev.params, ev.tokenizer, [texts[i] for i in idx],
                              options, c.eval.max_len, width=width, rng=ev.key(idx[0]))
      for i, r in zip(idx, res):
        middles[i] = r["spans"][0].replace(eos, "")
  elif c.eval.infilling_mode == "fim":
    prompts = ["<|bos|>" + infilling.build_fim_prompt(t.prefix, t.suffix) for t in tasks]
    rows, _ = ev.generate(prompts, policy, value, c.eval.max_new_tokens, c.eval.max_len,
                          c.eval.batch_size)
    middles = [r["completion"] for r in rows]
  else:  # eval_config.validate refuses it before the model loads.
    raise ValueError(f"eval.infilling_mode must be inplace or fim, got {c.eval.infilling_mode!r}")
  res = infilling.score_infills(tasks, middles, workers=c.eval.workers, limits=_limits(c))
  return {"decoder": _decoder_name(policy, value), "mode": c.eval.infilling_mode,
          "tasks": len(tasks), "pass_rate": res["pass_rate"],
          "pass_rate_by_kind": res["pass_rate_by_kind"]}


def task_throughput(ev: Evaluator) -> dict:
  c = ev.config
  max_len = c.sample.max_len or c.data.seq_len
  if c.data.corpus == "synthetic":
    _, _, prompts = synthetic_prompts(c, ev.tokenizer, c.eval.num_examples)
    max_len = _synthetic_context(ev, prompts)
  else:
    ds = pipeline.build_dataset(c.data, ev.tokenizer, "validation", c.data.seq_len,
                                c.eval.num_examples, c.seed, ev.workdir)
    half = c.data.seq_len // 2
    prompts = ["<|bos|>" + ev.tokenizer.decode(row[1:half]).replace("<|", "< |")
               for row in ds.get_batch(0)["tokens"]]
  out = _track(ev, {"decoders": {}})
  for policy, value in _parse_decoders(c.eval.decoders):
    _, summary = ev.generate(prompts, policy, value, c.sample.max_new_tokens, max_len,
                             c.eval.batch_size)
    out["decoders"][summary["decoder"]] = summary
  if ev.model.cfg.moe is not None:
    policy, value = next((d for d in _parse_decoders(c.eval.decoders) if d[0] != "ar"),
                         ("threshold", 0.9))
    for mode in ("token", "block"):
      cfg = dataclasses.replace(ev.model.cfg,
                                moe=dataclasses.replace(ev.model.cfg.moe, router_mode=mode))
      _, summary = ev.generate(prompts, policy, value, c.sample.max_new_tokens, max_len,
                               c.eval.batch_size, model=transformer.Transformer(cfg))
      out[f"unique_experts_{mode}_routing"] = summary["unique_experts_per_layer"]
    out["num_experts"] = ev.model.cfg.moe.num_experts
  return out


def task_long_context(ev: Evaluator) -> dict:
  c, e = ev.config, ev.config.eval
  lengths = eval_config.long_context_lengths(c)
  # Each cell once: a repeated length, depth or task ("0.5,0.50") built its prompts twice
  # and weighed that cell double in the overall exact match.
  depths = list(dict.fromkeys(float(d) for d in e.long_context_depths.split(",")))
  suite = long_context_data.make_suite(
      ev.tokenizer, lengths=lengths, depths=depths, per_cell=e.long_context_per_cell,
      tasks=list(dict.fromkeys(_split(e.long_context_tasks))),
      num_pairs=e.long_context_num_pairs, seed=e.long_context_seed)
  # A model trained on corpus="long_context" read its prompts as BOS prompt SEP.
  wrap = c.data.corpus == "long_context"
  out = _track(ev, {"lengths": lengths, "decoders": {}})
  for policy, value in _parse_decoders(e.decoders):
    options = ev.options(policy, value)
    meter = metrics_writer.Progress(len(suite), unit="prompts", stream=sys.stdout,
                                    label=f"long_context {_decoder_name(policy, value)}",
                                    interval_s=30.0)
    rows = long_context_eval.retrieval(
        ev.model, ev.params, ev.tokenizer, suite, options, e.long_context_max_new_tokens,
        decoder="ar" if policy == "ar" else "block", wrap=wrap, batch_size=e.batch_size,
        rng=ev.key(0), on_example=lambda i, row: meter.update())
    rate = lambda **w: long_context_eval.accuracy(rows, **w)[0]
    name = _decoder_name(policy, value)
    out["decoders"][name] = {
        "exact_match": rate(),
        "by_length": {str(n): rate(length=n) for n in lengths},
        "by_task": {t: rate(task=t) for t in sorted({r["task"] for r in rows})},
        "by_depth": {str(d): rate(depth=d) for d in sorted({r["depth"] for r in rows})},
        "char_accuracy": long_context_eval.char_rate(rows),
        # A few answers as decoded, to read what the model does with the rest.
        "samples": [{k: r[k] for k in ("task", "length", "depth", "answer", "completion")}
                    for r in rows[:4]]}
    print(f"  {name}: exact match {out['decoders'][name]['exact_match']:.3f} "
          f"(characters {out['decoders'][name]['char_accuracy']:.3f}) over "
          f"{len(rows)} prompts; by length "
          + ", ".join(f"{k}: {v:.2f}" for k, v in out["decoders"][name]["by_length"].items()),
          flush=True)
  return out


TASK_FNS = {"likelihood": task_likelihood, "synthetic": task_synthetic,
            "humaneval": task_humaneval, "humaneval_infilling": task_humaneval_infilling,
            "throughput": task_throughput, "long_context": task_long_context}


def _flatten(prefix: str, tree: Any, out: dict) -> dict:
  """The numbers of ``tree`` by slash-joined key; ints stay ints (counts print exactly)."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
  elif isinstance(tree, (int, float, np.integer, np.floating)) and not isinstance(
      tree, (bool, np.bool_)):
    out[prefix] = int(tree) if isinstance(tree, (int, np.integer)) else float(tree)
  return out


def _cell(value: Any) -> str:
  """A Markdown table cell: counts exactly, other numbers to 4 digits, text escaped."""
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  # A "|" or a line break would end the table cell or row.
  return str(value).replace("|", "\\|").replace("\n", " ")


def _leaves(prefix: str, tree: Any, out: dict) -> dict:
  """Every leaf of ``tree`` by slash-joined key, as the JSON file holds it: numbers, text
  (a decoder, an infilling mode, an error) and lists (written as compact JSON)."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      _leaves(f"{prefix}/{k}" if prefix else str(k), v, out)
  elif isinstance(tree, (bool, np.bool_)):
    out[prefix] = json.dumps(bool(tree))
  elif isinstance(tree, (list, tuple)) or tree is None:
    out[prefix] = json.dumps(metrics_writer.finite_or_none(tree), default=str)
  else:
    flat = _flatten(prefix, tree, {})
    out[prefix] = flat[prefix] if flat else tree
  return out


def markdown(results: dict) -> str:
  """One table of every result leaf (task / metric / value), a failed task's error too."""
  flat = _leaves("", results, {})
  lines = ["| metric | value |", "|---|---|"]
  lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in flat.items()]
  return "\n".join(lines)


def _new_output_stem(out_dir: str) -> str:
  """``out_dir/eval_<time>``, suffixed ``_1``, ``_2``, ... so no earlier run is overwritten."""
  base = os.path.join(out_dir, f"eval_{time.strftime('%Y%m%d_%H%M%S')}")
  for i in range(10_000):
    stem = base if i == 0 else f"{base}_{i}"
    if os.path.exists(stem + ".md"):
      continue
    try:  # Exclusive create: two runs finishing in the same second get two stems.
      with open(stem + ".json", "x", encoding="utf-8"):
        return stem
    except FileExistsError:
      continue
  raise RuntimeError(f"eval: no free output name for {base} in {out_dir}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs ``config.eval.tasks`` on the latest checkpoint of ``workdir``.

  Results go to a new ``WORKDIR/eval/eval_<time>[_<i>].{json,md}`` pair (an earlier
  run's files are never overwritten) and into ``metrics.jsonl``.

  Raises:
    ValueError: on an invalid ``eval`` field (before the model loads).
    RuntimeError: after writing the results, if a task raised; its entry is its
      partial results plus ``{"error": "<type>: <message>"}`` and the other tasks are
      scored.
    KeyboardInterrupt: after writing the results of the tasks finished before it (and
      the interrupted task's partial ones); the later tasks do not run.
  """
  e = eval_config.default_eval_config()
  if config.get("eval") is not None:  # Runs saved before a field existed get its default.
    e.update(config.eval.to_dict())
  tasks = _split(e.tasks)
  if not tasks:
    # Nothing to run: loading the model only to write an empty results file would read
    # as an evaluation that measured nothing.
    raise ValueError(f"eval.tasks is empty ({e.tasks!r}); choose from {eval_config.TASKS}")
  unknown = [t for t in tasks if t not in eval_config.TASKS]
  if unknown:
    raise ValueError(f"eval.tasks has unknown task(s) {unknown}; choose from {eval_config.TASKS}")
  # A task named twice would run twice and keep only its second result.
  if len(set(tasks)) < len(tasks):
    twice = next(t for i, t in enumerate(tasks) if t in tasks[:i])
    print(f"eval: eval.tasks names {twice!r} more than once ({e.tasks!r}); "
          f"each task runs once", flush=True)
  tasks = list(dict.fromkeys(tasks))
  _parse_decoders(e.decoders, warn=True)
  eval_config.validate(e)
  # Every decoder is deterministic at temperature 0: pass@k (k > 1) was pass@1, n times.
  temperature = config.get("sample", {}).get("temperature", 0.0)
  if "humaneval" in tasks and e.samples_per_problem > 1 and not temperature:
    raise ValueError(f"eval.samples_per_problem={e.samples_per_problem} with sample.temperature"
                     f"={temperature}: greedy samples are all the same; set sample.temperature"
                     " > 0 (Codex: 0.2 for pass@1, 0.8 for pass@100) or samples_per_problem=1")
  lc_tasks = _split(e.long_context_tasks)
  bad = [t for t in lc_tasks if t not in long_context_data.TASKS]
  if "long_context" in tasks and bad:
    raise ValueError(f"eval.long_context_tasks has unknown task(s) {bad}; choose from "
                     f"{long_context_data.TASKS}")
  if "long_context" in tasks and not lc_tasks:
    raise ValueError(f"eval.long_context_tasks is empty ({e.long_context_tasks!r}); choose "
                     f"from {long_context_data.TASKS}")
  kinds = [k.strip() for k in e.infilling_kinds.split(",") if k.strip()]
  if "humaneval_infilling" in tasks and (not kinds or set(kinds) - set(infilling.KINDS)):
    raise ValueError(f"eval.infilling_kinds must name kinds from {infilling.KINDS}, "
                     f"got {e.infilling_kinds!r}")
  config, model, tokenizer, params = inference.load_for_inference(workdir, config)
  # Before the tasks: an output folder that cannot be made (a file in its place, a
  # read-only workdir) must fail now, not after hours of tasks whose results it loses.
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  config.eval = e
  ev = Evaluator(config, model, tokenizer, params, workdir)
  results, failed, interrupted = {}, [], False
  with inference.inference_context(config):
    for name in tasks:
      t0 = time.time()
      ev.partial = None
      print(f"eval: {name} ...", flush=True)
      try:
        results[name] = TASK_FNS[name](ev)
      except KeyboardInterrupt:
        # Ctrl-C stops the run, but the finished tasks (hours of decoding) are written
        # first, with what this one measured; the interrupt is raised after writing.
        results[name] = {**(ev.partial or {}), "error": "KeyboardInterrupt: interrupted"}
        interrupted = True
        print(f"eval: {name} interrupted after {time.time() - t0:.1f}s; writing the "
              f"results so far", flush=True)
        break
      except Exception as e:  # pylint: disable=broad-except
        # One broken task must not discard the others' results: it is recorded, the
        # rest run, and run() raises once everything is written.
        traceback.print_exc()
        # What the task measured before it raised (earlier decoders) is kept.
        results[name] = {**(ev.partial or {}), "error": f"{type(e).__name__}: {e}"}
        failed.append(name)
        print(f"eval: {name} FAILED after {time.time() - t0:.1f}s: "
              f"{results[name]['error']}", flush=True)
        continue
      print(f"eval: {name} done in {time.time() - t0:.1f}s", flush=True)
  os.makedirs(out_dir, exist_ok=True)  # Again, in case it was removed meanwhile.
  stem = _new_output_stem(out_dir)
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(metrics_writer.finite_or_none(results), f, indent=2,
              allow_nan=False)
  table = markdown(results)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(f"# Evaluation of {workdir}\n\n{table}\n")
  writer = metrics_writer.MetricsWriter(workdir, tensorboard=False)
  # Read-only: a writable manager on a workdir a trainer may hold is not ours to open.
  step = (checkpoints.saved_steps(os.path.join(workdir, "checkpoints")) or [0])[-1]
  writer.write(step, _flatten("", results, {}), prefix="eval/")
  writer.close()
  print(table)
  print(f"wrote {stem}.json and {stem}.md", flush=True)
  if interrupted:
    raise KeyboardInterrupt(f"eval: interrupted during {list(results)[-1]}; the finished "
                            f"tasks' results are in {stem}.json")
  if failed:
    raise RuntimeError(f"eval: task(s) {failed} failed ("
                       + "; ".join(f"{n}: {results[n]['error']}" for n in failed)
                       + f"); the other results are in {stem}.json")
  return results
