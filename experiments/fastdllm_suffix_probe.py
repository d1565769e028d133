"""Does a Fast-dLLM v2 model predict the next token when the rest of its block is MASK?

Left-to-right block decoding asks the model, again and again, for token k of an answer
given tokens < k and a block tail that is all MASK. Training draws its masks i.i.d. per
block, so that context is rare there. This probe takes held-out questions with the base
model's greedy answers (``<workdir>/distill``) and, for several committed lengths k,
reads the token-shifted prediction of answer token k (the output at k-1) in the
training layout ``[x_t ; x_0]`` under two contexts:

* ``suffix``: answer tokens >= k all MASK (what the decoder sees);
* ``span``: only tokens k .. k+span-1 MASK, the answer's later tokens clean (a context
  i.i.d. masking produces often).

It reports how often the prediction is the reference token, and how often it repeats
token k-1 (the "vast vast vast" failure), for both, plus the adapted model's own causal
(AR) prediction of the same token. One forward per context, all rows batched.

  python experiments/fastdllm_suffix_probe.py --workdir=runs/lora60 --tag=lora60

Writes experiments/results/fastdllm_suffix_probe{_tag}.{json,md}.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import sft
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.model import build

_HERE = os.path.dirname(os.path.abspath(__file__))


def heldout_answers(config, workdir: str, n: int) -> list[tuple[str, str]]:
  """(question, base greedy answer) of the first ``n`` held-out distilled records."""
  recs = sft.load_records("distilled", "validation", config.data.validation_fraction, n,
                          workdir=workdir)
  return [(r[0], r[1]) for r in recs]


def build_rows(tok, pairs, keeps, span: int, width: int, block: int):
  """Token rows, masks and the probed position for every (pair, k, context)."""
  rows, meta = [], []
  for q, a in pairs:
    head = sft.render(tok, (q, ""))[0]
    ans = tok.encode(a)
    for k in keeps:
      if k + span > len(ans) or len(head) + len(ans) > width:
        continue
      toks = np.full(width, tok.eos_id, np.int32)
      toks[:len(head)], toks[len(head):len(head) + len(ans)] = head, ans
      i = len(head) + k
      for ctx in ("suffix", "span"):
        m = np.zeros(width, bool)
        # Block-diffusion masking is per block: positions past i's block are the next
        # blocks, which the probed block never sees; mask the rest of this block only.
        end = (i // block + 1) * block
        m[i:end if ctx == "suffix" else min(i + span, end)] = True
        rows.append((toks, m))
        meta.append({"question": q, "k": k, "context": ctx, "position": i,
                     "reference": int(ans[k]), "previous": int(ans[k - 1])})
  return rows, meta


def check_flags(ap: argparse.ArgumentParser, args) -> list[int]:
  """The committed lengths k; bad flags refused by name before the checkpoint loads.

  k = 0 read answer token -1 as "token k-1" and probed the prompt's last position; a
  --span of 0 masked nothing, so the probed position fell back to 0.
  """
  try:
    keeps = [int(k) for k in args.keeps.split(",")]
  except ValueError:
    ap.error(f"--keeps={args.keeps!r}: comma-separated integers expected")
  if min(keeps) < 1:
    ap.error(f"--keeps={args.keeps!r}: every k must be >= 1 (token k-1 is compared)")
  for name in ("span", "batch", "prompts"):
    if getattr(args, name) < 1:
      ap.error(f"--{name}={getattr(args, name)} must be >= 1")
  return keeps


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a configs/smollm2_fastdllm.py run")
  ap.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = the latest")
  ap.add_argument("--prompts", type=int, default=6, help="held-out questions")
  ap.add_argument("--keeps", default="2,4,6,8,10,12,14,16",
                  help="committed answer tokens k before the probed one")
  ap.add_argument("--span", type=int, default=4, help="masked tokens in the span context")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--tag", default="")
  args = ap.parse_args()
  keeps = check_flags(ap, args)
  t0 = time.time()
  config = checkpoints.load_config(args.workdir)
  config, model, tok, params, step = inference.load_for_inference(
      args.workdir, config, step=None if args.step < 0 else args.step, return_step=True)
  block = config.diffusion.block_size
  width = config.data.seq_len
  pairs = heldout_answers(config, args.workdir, args.prompts)
  rows, meta = build_rows(tok, pairs, keeps, args.span, width, block)
  if not rows:
    print(f"warning: no probe rows: none of the {len(pairs)} held-out answers is longer "
          f"than k + --span={args.span} for any --keeps={args.keeps!r} and fits seq_len "
          f"{width}; the rates are empty", file=sys.stderr, flush=True)
  apply_fn = build.make_apply(model)

  @jax.jit
  def predict(x0, m, pos):
    xt = jnp.where(m, tok.mask_id, x0)
    seg = jnp.zeros_like(x0)
    logits, _ = apply_fn(params, jnp.concatenate([xt, x0], axis=1),
                         masks.training_meta(width, block, x0.shape[0], seg))
    shifted = fastdllm.shifted_logits(logits, block).at[..., tok.mask_id].set(-jnp.inf)
    clean = jnp.broadcast_to(jnp.arange(width), x0.shape)
    ar, _ = apply_fn(params, x0, masks.make_meta(clean, 1, masks.CLEAN, segment_ids=seg))
    take = lambda lg: jnp.take_along_axis(jnp.argmax(lg, -1), pos[:, None], 1)[:, 0]
    return take(shifted), jnp.take_along_axis(jnp.argmax(ar, -1), pos[:, None] - 1, 1)[:, 0]

  preds, ars = [], []
  with inference.inference_context(config):
    for s in range(0, len(rows), args.batch):
      chunk = rows[s:s + args.batch]
      chunk = chunk + [chunk[-1]] * (args.batch - len(chunk))  # One shape, one compile.
      x0 = np.stack([r[0] for r in chunk])
      m = np.stack([r[1] for r in chunk])
      pos = np.array([int(np.argmax(r[1])) for r in chunk], np.int32)
      p, a = jax.device_get(predict(x0, m, pos))
      n = min(args.batch, len(rows) - s)
      preds += p[:n].tolist()
      ars += a[:n].tolist()
      print(f"[{s + n}/{len(rows)}] rows, {time.time() - t0:.0f} s", flush=True)
  for r, p, a in zip(meta, preds, ars):
    r.update(predicted=p, predicted_text=tok.decode(np.asarray([p], np.int32)), ar=a)
  summary = {}
  for ctx in ("suffix", "span"):
    rs = [r for r in meta if r["context"] == ctx]
    # No rows: None, not the mean of nothing (NaN, which is not JSON).
    rate = lambda hits: float(np.mean(hits)) if hits else None
    summary[ctx] = {"rows": len(rs),
                    "reference": rate([r["predicted"] == r["reference"] for r in rs]),
                    "repeats_previous": rate([r["predicted"] == r["previous"] for r in rs]),
                    "ar_reference": rate([r["ar"] == r["reference"] for r in rs])}
  result = {"command": " ".join(["python", "experiments/fastdllm_suffix_probe.py"] + sys.argv[1:]),
            "device": f"{jax.devices()[0].platform} ({os.cpu_count()} CPUs, {platform.machine()})",
            "jax": jax.__version__, "seconds": time.time() - t0, "args": vars(args),
            "step": step,  # The one loaded: the newest may not have restored.
            "summary": summary, "rows": meta}
  out = os.path.join(_HERE, "results", "fastdllm_suffix_probe" + (f"_{args.tag}" if args.tag else ""))
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, allow_nan=False)
  step_text = (f"checkpoint step {step}" if step is not None
               else "no checkpoint (the config's starting weights)")
  lines = ["# Next-token prediction with the block tail MASK vs a short masked span",
           "", f"`{result['command']}` on {result['device']}, jax {result['jax']}, "
           f"{result['seconds']:.0f} s; {step_text}; {len(pairs)} held-out "
           f"questions, committed lengths k = {args.keeps}, span {args.span}.", "",
           "| context | rows | = reference | repeats token k-1 | causal (AR) = reference |",
           "|---|---|---|---|---|"]
  fmt = lambda x: "-" if x is None else f"{x:.2f}"
  for ctx, s in summary.items():
    lines.append(f"| {ctx} | {s['rows']} | {fmt(s['reference'])} | "
                 f"{fmt(s['repeats_previous'])} | {fmt(s['ar_reference'])} |")
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {out}.{{json,md}}")


if __name__ == "__main__":
  main()
