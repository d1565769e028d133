r"""dMoE block routing: coverage p x minimum coreset size against held-out quality.

Three trained MoEs (issue 13), each evaluated on fixed weights under token routing (the
baseline) and block routing over a grid of coverage p and minimum coreset size:

* ``quickstart``: configs/quickstart.py with 16 experts, top-2, trained from scratch on the
  stdlib corpus (BD3-LM NELBO);
* ``synthetic``: configs/synthetic.py with 16 experts, top-2, trained from scratch on the
  synthetic tasks;
* ``upcycled``: SmolLM2-135M-Instruct (bundled GGUF) sparsely upcycled to 4 experts, top-2,
  briefly fine-tuned with the Fast-dLLM v2 objective and data by the trainer with
  ``train.trainable=moe`` (MoE layers only, for memory; see MODELS); quality is its
  masked CE. ``upcycled_at_init``: the same before fine-tuning.

All three are trained with token routing; block routing is applied at evaluation only.
For every setting the same held-out batches and noise draws are scored
(``evaluation/routing_sweep.py``). Unique experts are counted per routing block per MoE
layer: the noisy-stream blocks of the ``[x_t ; x_0]`` pass (what a decoder with an exact
block cache runs to denoise a block) and, with ``--decode_prompts``, real block decoding
at batch 1 (the sampler's unique experts per forward, prefill excluded).

  python experiments/dmoe_coverage_sweep.py            # trains what is missing; ~50 min
  python experiments/dmoe_coverage_sweep.py --quick    # ~2 min smoke test (tiny runs)
  python experiments/dmoe_coverage_sweep.py --rerender # Markdown + PNG from the JSON
Writes experiments/results/dmoe_coverage_sweep.{json,md,png} (/tmp/dmoe_coverage_sweep_quick.*
with --quick).
"""

import argparse
import json
import os
import platform
import re
import runpy
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DMOE_REDUCTION, DMOE_QUALITY = 69.5 / 14.6, 99.1  # dMoE: 69.5 -> 14.6 experts at 99.1%.

# name -> (config, trained-with overrides). Steps are sized for a shared 2-core CPU.
_MOE16 = ["model.moe.num_experts=16", "model.moe.top_k=2", "model.moe.block_min_experts=2"]
_QS_TRAIN = ["train.steps=250", "train.warmup_steps=25", "train.eval_every=250",
             "train.checkpoint_every=250", "train.log_every=25"]
MODELS = {
    "quickstart": ("configs/quickstart.py", _MOE16 + _QS_TRAIN),
    # dMoE as deployed: block routing in the training loop too (p=0.5, min=top_k), so
    # the experts and router adapt to the coreset; compared with ``quickstart`` (REFERENCE).
    "quickstart_block": ("configs/quickstart.py", _MOE16 + [
        "model.moe.router_mode=block", "model.moe.block_coverage=0.5"] + _QS_TRAIN),
    "synthetic": ("configs/synthetic.py", _MOE16 + [
        "train.steps=200", "train.warmup_steps=20", "train.eval_every=0",
        "train.checkpoint_every=200", "train.log_every=25"]),
    # Fast-dLLM v2 recipe (objective, complementary masks, block 32, SFT data) in the
    # trainer with train.trainable=moe: full AdamW over all 373M parameters of the E=4
    # model does not fit a 24 GB CPU machine, so only the MoE layers (routers + experts)
    # train and the rest stays frozen; one 128-token row per step (x2 complementary
    # copies) and remat keep the step near 10 GB. A higher peak LR than the config's 2e-5:
    # in a handful of steps the identical experts must move apart at all (their router
    # gets no loss gradient while they are identical).
    "upcycled": ("configs/smollm2_fastdllm.py", [
        "model.moe.upcycle_from_dense=True", "model.moe.num_experts=4", "model.moe.top_k=2",
        "model.moe.block_min_experts=2", "model.moe.impl=ragged_dot", "data.seq_len=128",
        "data.batch_size=1", "model.remat=True", "train.steps=12", "train.warmup_steps=2",
        "train.learning_rate=1e-4", "train.trainable=moe", "train.eval_every=0",
        "train.checkpoint_every=12", "train.log_every=1"]),
}
_QUICK_QS = ["model.moe.num_experts=8", "train.steps=6", "train.checkpoint_every=6",
             "train.eval_every=0", "train.log_every=3", "data.max_bytes=200000",
             "data.batch_size=8"]
QUICK = {  # Tiny runs: a smoke test of the whole pipeline, not a measurement.
    "quickstart": _QUICK_QS, "quickstart_block": _QUICK_QS,
    "synthetic": ["model.moe.num_experts=8", "train.steps=6", "train.checkpoint_every=6",
                  "train.log_every=3", "data.batch_size=8"],
}

# Row fields that are numbers, NaN where nothing was scored (no masked token: accuracy).
METRICS = ("nelbo", "masked_ce", "masked_accuracy", "quality_pct", "accuracy_pct")

# A model trained with block routing -> the same config trained with token routing, whose
# token-routing loss and expert count its rows are also compared with (same held-out
# batches and noise draws: same config, data and seed).
REFERENCE = {"quickstart_block": "quickstart"}


NOTES = [
    "Models are trained with token routing and block routing is applied to the same "
    "weights at evaluation, except those trained with block routing in the loop "
    "(`trained with block routing`), which are also compared with their token-trained "
    "reference.",
    "At upcycling every expert is a copy of the dense MLP and the top-k weights are "
    "renormalised, so any routing computes the dense function: quality is "
    "routing-invariant at init (`upcycled_at_init`, equal up to float summation order), and "
    "the router gets no gradient from the loss until the experts differ (only the "
    "load-balance and z-losses move it). A short fine-tune moves the experts only a little "
    "(see the expert divergence), so the upcycled model's quality is close to "
    "routing-invariant by construction; its unique-expert counts are still real.",
    "Unique experts per block are bounded by min(E, top_k x tokens in the block); dMoE's "
    "69.5 -> 14.6 come from a much larger MoE than E = 16 or 4 here, so compare the "
    "reduction factor and the quality kept, not the absolute counts.",
]


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_command(config: str, workdir: str, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "blockdiff_jax.main", f"--config={config}",
          f"--workdir={workdir}", "--mode=train"] + [f"--config.{o}" for o in overrides]


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def train(name: str, config: str, workdir: str, overrides: list[str]) -> dict:
  """Trains ``workdir`` unless it has a checkpoint; returns the command and step rate."""
  cmd = train_command(config, workdir, overrides)
  info = {"command": " ".join(cmd[1:]).replace(ROOT + "/", ""),
          "workdir": os.path.relpath(workdir, ROOT)}
  log_path = os.path.join(workdir, "train_log.txt")
  if not has_checkpoint(workdir):
    os.makedirs(workdir, exist_ok=True)
    log(f"{name}: training ({' '.join(cmd[3:])})")
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as f:
      proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
      raise RuntimeError(f"{name}: training failed; see {log_path}")
    info["train_wall_s"] = time.time() - t0
  if os.path.exists(log_path):
    text = open(log_path, encoding="utf-8").read()
    steps = re.findall(r"\[(\d+)/(\d+)\s", text)
    rates = re.findall(r"([\d.]+) step/s", text)
    losses = re.findall(r"\] [\d.]+ step/s .*? (?:nelbo|masked ce|noisy ce) ([\d.]+)", text)
    if steps:
      info["steps"] = int(steps[-1][0])
    if rates:
      info["s_per_step_last"] = 1.0 / float(rates[-1])
    if losses:
      info["train_nelbo_first_last"] = [float(losses[0]), float(losses[-1])]
  return info


def apply_overrides(config, overrides: list[str]) -> None:
  """``a.b=v`` strings onto a ConfigDict, cast to each field's current type."""
  for o in overrides:
    key, value = o.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    cur = node[leaf]
    node[leaf] = (value == "True" if isinstance(cur, bool) else type(cur)(value)
                  if cur is not None else value)


def upcycled_setup(config_path: str, overrides: list[str], workdir: str):
  """(config, model, tokenizer, params) of the upcycled SmolLM2 at initialisation
  (``workdir`` caches the converted GGUF)."""
  from blockdiff_jax.checkpoint import initial  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(os.path.join(ROOT, config_path))["get_config"]()
  apply_overrides(config, overrides)
  os.makedirs(workdir, exist_ok=True)
  config, model, tokenizer = initial.build_model(config, workdir)
  return config, model, tokenizer, initial.initial_params(config, model, workdir)


def expert_divergence(params) -> list[float]:
  """Per MoE layer: mean over expert pairs of ||W_i - W_j|| / mean_i ||W_i|| (all three
  expert matrices together). 0 = identical experts (an upcycled model at init)."""
  out = []

  def visit(tree):
    if isinstance(tree, dict):
      if "wi_gate" in tree and "router" in tree:
        ws = [np.asarray(tree[k], np.float32) for k in ("wi_gate", "wi_up", "wo")]
        lead = ws[0].shape[:-3]  # () per layer, (n,) for a scanned stack.
        flat = np.concatenate([w.reshape(lead + (w.shape[len(lead)], -1)) for w in ws], -1)
        flat = flat.reshape((-1,) + flat.shape[-2:])
        for layer in flat:
          e = layer.shape[0]
          norm = np.mean(np.linalg.norm(layer, axis=-1))
          d = [np.linalg.norm(layer[i] - layer[j]) for i in range(e) for j in range(i + 1, e)]
          out.append(float(np.mean(d) / max(norm, 1e-30)))
      else:
        for v in tree.values():
          visit(v)
  visit(jax.device_get(params))
  return out


def decode_prompts(name: str, config, tokenizer, n: int) -> list[str]:
  """Held-out prompts for block decoding (as the eval harness's throughput task)."""
  from blockdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  if config.data.corpus == "synthetic":
    return evaluate.synthetic_prompts(config, tokenizer, n)[2]
  if config.data.corpus == "sft":
    ds = pipeline.build_dataset(config.data, tokenizer, "validation", config.data.seq_len, 1,
                                config.seed)
    prompts = []
    for i in range(n):
      row = ds.get_batch(i)
      first = int(np.argmax(np.asarray(row["loss_mask"][0]) > 0))  # Prompt = unscored prefix.
      prompts.append(tokenizer.decode(np.asarray(row["tokens"][0][:max(first, 1)])))
    return prompts
  ds = pipeline.build_dataset(config.data, tokenizer, "validation", config.data.seq_len, n,
                              config.seed)
  half = config.data.seq_len // 2
  return ["<|bos|>" + tokenizer.decode(row[1:half]).replace("<|", "< |")
          for row in ds.get_batch(0)["tokens"]]


def best_within(rows: list[dict], pct: float, key: str = "quality_pct") -> dict | None:
  """The block setting with the fewest unique experts per block at >= pct% of ``key``
  (quality_pct: of the loss; accuracy_pct: of masked-token accuracy)."""
  ok = [r for r in rows if r["mode"] == "block" and r[key] >= pct]
  return min(ok, key=lambda r: (r["unique_experts_noisy_block"], -r[key])) if ok else None


def heldout_batches(ds, num_batches: int) -> list[dict]:
  """The first ``num_batches`` batches of ``ds``, cut at a finite split's last row
  (``likelihood.distinct_rows``): rows past it repeat earlier ones and would weigh double."""
  from blockdiff_jax.evaluation import likelihood  # pylint: disable=g-import-not-at-top
  distinct, batches, first = likelihood.distinct_rows(ds), [], 0
  for i in range(num_batches):
    if distinct is not None and first >= distinct:
      break
    b = {kk: jnp.asarray(v) for kk, v in ds.get_batch(i).items()
         if kk in ("tokens", "loss_mask", "segment_ids")}
    keep = len(b["tokens"]) if distinct is None else min(len(b["tokens"]), distinct - first)
    first += len(b["tokens"])
    batches.append({kk: v[:keep] for kk, v in b.items()})
  return batches


def sweep_model(name: str, workdir: str, args, loaded=None) -> dict:
  """Runs the routing grid on held-out batches of a trained workdir (or of ``loaded``:
  (config, model, tokenizer, params))."""
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.diffusion import config as diffusion_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import routing_sweep  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import transformer  # pylint: disable=g-import-not-at-top

  config, model, tokenizer, params = loaded or inference.load_for_inference(workdir)
  moe = model.cfg.moe
  e, k = moe.num_experts, moe.top_k
  coverages = [float(p) for p in args.coverages.split(",")]
  named = {"k": k, "2k": 2 * k, "E/2": e // 2}
  # A lookup, not `get(m) or int(m)`: E/2 = 0 (one expert) fell through to int("E/2").
  mins = [named[m] if m in named else int(m) for m in args.min_sizes.split(",")]
  settings = routing_sweep.settings_grid(e, k, coverages, mins)
  batch_size = args.batch_size or config.data.batch_size
  ds = pipeline.build_dataset(config.data, tokenizer, "validation", config.data.seq_len,
                              batch_size, config.seed, workdir)
  batches = heldout_batches(ds, args.batches)
  obj = diffusion_config.objective(config, tokenizer.mask_id)
  rows_read = sum(len(b["tokens"]) for b in batches)
  log(f"{name}: E={e} top_k={k}, trained with {moe.router_mode} routing; {len(settings)} "
      f"settings x {len(batches)} batches ({rows_read} rows of {config.data.seq_len})")
  t0 = time.time()

  def progress(msg):
    done = int(msg[1:msg.index("/")])
    rate = (time.time() - t0) / done
    log(f"{name} {msg}  ({rate:.0f} s/setting, ETA {rate * (len(settings) - done) / 60:.1f} min)")

  with inference.inference_context(config):
    rows = routing_sweep.sweep(model, params, batches, obj, settings, seed=args.seed,
                               noise_samples=args.noise_samples, log=progress)
    decode = {}
    if args.decode_prompts and name in args.decode_models.split(","):
      ev = evaluate.Evaluator(config, model, tokenizer, params)
      prompts = decode_prompts(name, config, tokenizer, args.decode_prompts)
      picks = [settings[0]] + [s for s in settings[1:] if s.coverage == 0.9 and s.min_experts == k]
      best = best_within(rows, 99.0)
      if best is not None:
        picks += [s for s in settings if s.name == best["setting"] and s not in picks]
      max_len = config.sample.max_len or config.data.seq_len
      from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
      longest = max(len(layout.parse(tokenizer, p).ids) for p in prompts)
      # The config's max_new_tokens may not fit after a long prompt (synthetic: 37 + 32 >
      # 64): generate what fits in the trained context.
      new_tokens = min(config.sample.max_new_tokens, max_len - longest)
      for s in picks:
        routed = transformer.Transformer(routing_sweep.with_routing(model.cfg, s))
        _, summ = ev.generate(prompts, config.sample.policy, None, new_tokens, max_len, 1,
                              model=routed)
        decode[s.name] = {k2: summ[k2] for k2 in ("unique_experts_per_layer", "tpf", "nfe",
                                                  "generated_tokens")}
        decode[s.name]["max_new_tokens"] = new_tokens
        log(f"{name} decode {s.name}: {summ['unique_experts_per_layer']:.2f} unique experts "
            f"per layer per forward (batch 1), TPF {summ['tpf']:.2f}")
  for r in rows:
    if r["setting"] in decode:
      r["decode"] = decode[r["setting"]]
  quality = "masked CE (Fast-dLLM v2 objective, nats/token)" if config.diffusion.get(
      "objective", "bd3lm") == "fastdllm" else "NELBO (nats/token, t over [eps, 1])"
  return {"num_experts": e, "top_k": k, "trained_routing": moe.router_mode,
          "trained_coverage": moe.block_coverage, "trained_min_experts": moe.block_min_experts,
          "quality_metric": quality, "batches": len(batches), "heldout_rows": rows_read,
          "batch_size": batch_size,
          "seq_len": config.data.seq_len, "block_size": config.diffusion.block_size,
          "noise_samples": args.noise_samples, "decode_prompts": len(decode) and args.decode_prompts,
          "expert_divergence_per_layer": expert_divergence(params),
          "sweep_s": time.time() - t0, "rows": rows}


def init_control(loaded, workdir: str, args) -> dict:
  """The upcycled model before fine-tuning (identical experts) on a small routing grid."""
  small = argparse.Namespace(**{**vars(args), "coverages": "0.5,0.9", "min_sizes": "k",
                                "batches": 1, "decode_prompts": 0})  # ``args`` unchanged.
  return sweep_model("upcycled_at_init", workdir, small, loaded)


def summarize(m: dict) -> dict:
  rows = m["rows"]
  p09 = next((r for r in rows if r["coverage"] == 0.9 and r["min_experts"] == m["top_k"]), None)
  brief = lambda r, *keys: {"unique_per_block": r["unique_experts_noisy_block"],
                            "reduction": r["expert_reduction"], **{f: r[f] for f in keys}}
  out = {"token_unique_per_block": rows[0]["unique_experts_noisy_block"]}
  for pct in (99.0, DMOE_QUALITY):
    b = best_within(rows, pct)
    out[f"best_within_{pct:g}"] = None if b is None else {
        "setting": b["setting"], **brief(b, "quality_pct")}
  b = best_within(rows, 99.0, "accuracy_pct")
  out["best_within_99_accuracy"] = None if b is None else {
      "setting": b["setting"], **brief(b, "accuracy_pct", "quality_pct")}
  if p09:
    out["p0.9_min_k"] = brief(p09, "quality_pct", "accuracy_pct")
  return out


def against_reference(m: dict, ref: dict) -> list[dict]:
  """Each row of ``m`` against ``ref``'s token routing (loss and accuracy kept, experts)."""
  base = ref["rows"][0]
  assert base["mode"] == "token", base
  return [{"setting": r["setting"], "unique": r["unique_experts_noisy_block"],
           "reduction": base["unique_experts_noisy_block"] / r["unique_experts_noisy_block"],
           "quality_pct": 100.0 * base["nelbo"] / r["nelbo"],
           "accuracy_pct": 100.0 * r["masked_accuracy"] / base["masked_accuracy"],
           "trained_setting": (r["coverage"] == m.get("trained_coverage")
                               and r["min_experts"] == m.get("trained_min_experts"))}
          for r in m["rows"]]


def reference_lines(name: str, m: dict, result: dict) -> list[str]:
  ref_name = REFERENCE.get(name)
  if m["trained_routing"] != "block" or ref_name not in result["models"]:
    return []
  ref = result["models"][ref_name]
  rows = against_reference(m, ref)
  lines = [f"Against `{ref_name}` (the same config trained with token routing) under token "
           f"routing: {ref['rows'][0]['unique_experts_noisy_block']:.2f} unique experts per "
           f"noisy block, loss {ref['rows'][0]['nelbo']:.4f}. `*` = the setting trained with.",
           "", "| setting | unique / noisy block | fewer than the reference | % of its loss | "
           "% of its accuracy |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['setting']}{' *' if r['trained_setting'] else ''} | {r['unique']:.2f} "
                 f"| {r['reduction']:.2f}x | {r['quality_pct']:.2f} | {r['accuracy_pct']:.2f} |")
  return lines + [""]


def markdown(result: dict) -> str:
  lines = [f"# dMoE block routing: coverage p x minimum coreset size{' (quick)' * result['quick']}",
           "", f"Machine: {result['machine']}; JAX {result['jax']}. "
           f"Command: `{result['command']}` ({result['seconds'] / 60:.1f} min).", "",
           "Unique experts are counted **per routing block per MoE layer** (one row, one stream, "
           "one block id: the group dMoE pools its coreset over), averaged over blocks and "
           "layers, on the noisy blocks of the held-out `[x_t ; x_0]` pass — the forward a "
           "decoder with an exact block cache runs to denoise that block. `clean` is the same "
           "for the clean stream (committing a block). `coreset` is the allowed set's size. "
           "Quality % = token routing's loss / this loss (100 = equal; the loss is "
           "lower-is-better); acc % = masked-token accuracy / token routing's. Every setting "
           "scores the same batches with the same noise draws. `decode` = unique experts per "
           "layer per forward in real block decoding at batch 1 (prefill excluded).",
           "", f"The bar (dMoE): {69.5} -> {14.6} unique experts per layer "
           f"({DMOE_REDUCTION:.2f}x fewer) at {DMOE_QUALITY}% of quality.", ""]
  for name, m in result["models"].items():
    s = summarize(m)
    tr = result["training"].get(name, {"command": "none: the upcycled SmolLM2 before any "
                                                  "fine-tuning (identical experts)", "steps": 0})
    div = m["expert_divergence_per_layer"]
    lines += [f"## {name}: E={m['num_experts']}, top-{m['top_k']}, trained with "
              f"{m['trained_routing']} routing", "",
              f"Training: `{tr.get('command', '?')}`; {tr.get('steps', '?')} steps"
              + (f", {tr['s_per_step_last']:.2f} s/step (last logged)" if "s_per_step_last" in tr
                 else "") + (f", train loss {tr['train_nelbo_first_last'][0]:.3f} -> "
                             f"{tr['train_nelbo_first_last'][1]:.3f}"
                             if "train_nelbo_first_last" in tr else "") + ".",
              f"Quality: held-out {m['quality_metric']}, "
              f"{m.get('heldout_rows', m['batches'] * m['batch_size'])} rows of {m['seq_len']} "
              f"tokens ({m['batches']} batches), {m['noise_samples']} noise draw(s) "
              f"each; block size {m['block_size']}. Expert divergence (mean pairwise "
              f"||W_i-W_j|| / ||W||, per layer): min {min(div):.3g}, mean {np.mean(div):.3g}, "
              f"max {max(div):.3g} (0 = identical experts).", "",
              "| setting | p | min | unique / noisy block | unique / clean block | coreset | "
              "token/block | loss | quality % | masked acc | acc % | decode unique/fwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
      dec = r.get("decode", {}).get("unique_experts_per_layer")
      lines.append(
          f"| {r['setting']} | {r['coverage'] if r['coverage'] is not None else '-'} | "
          f"{r['min_experts'] if r['min_experts'] is not None else '-'} | "
          f"{r['unique_experts_noisy_block']:.2f} | {r['unique_experts_clean_block']:.2f} | "
          f"{r['coreset_noisy_block']:.2f} | {r['expert_reduction']:.2f}x | {r['nelbo']:.4f} | "
          f"{r['quality_pct']:.2f} | {r['masked_accuracy']:.4f} | {r['accuracy_pct']:.2f} | "
          f"{'-' if dec is None else f'{dec:.2f}'} |")
    b = s.get("best_within_99")
    p = s.get("p0.9_min_k")
    lines += ["", f"Token routing: {s['token_unique_per_block']:.2f} unique experts per noisy "
              "block. " + ("Fewest within 99% of quality: " + (
                  f"{b['setting']}, {b['unique_per_block']:.2f} ({b['reduction']:.2f}x fewer) at "
                  f"{b['quality_pct']:.2f}%." if b else "none.")) + (
                  " Fewest within 99% of masked-token accuracy: {setting}, {unique_per_block:.2f} "
                  "({reduction:.2f}x fewer) at {accuracy_pct:.2f}% of accuracy, {quality_pct:.2f}% "
                  "of the loss.".format(**s["best_within_99_accuracy"])
                  if s.get("best_within_99_accuracy") else "") + (
                  f" At p=0.9, min={m['top_k']}: {p['unique_per_block']:.2f} "
                  f"({p['reduction']:.2f}x fewer) at {p['quality_pct']:.2f}% of quality, "
                  f"{p['accuracy_pct']:.2f}% of accuracy." if p else ""), ""]
    lines += reference_lines(name, m, result)
  if result.get("findings"):  # Written into the JSON by hand after reading a run.
    lines += ["## Findings of this run", ""] + [f"- {n}" for n in result["findings"]] + [""]
  if result.get("errors"):
    lines += ["## Not run", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()] + [""]
  lines += ["## Notes", ""] + [f"- {n}" for n in NOTES]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  """Unique experts per noisy block against quality (top row: % of token routing's loss,
  bottom: % of its masked-token accuracy), one curve over p per minimum coreset size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = result["models"]
  fig, axes = plt.subplots(2, len(models), figsize=(4.8 * len(models), 8), squeeze=False)
  for col, (name, m) in enumerate(models.items()):
    rows = m["rows"]
    tok = rows[0]
    for row, (key, label) in enumerate((("quality_pct", "loss"),
                                        ("accuracy_pct", "masked-token accuracy"))):
      ax = axes[row][col]
      for mn in sorted({r["min_experts"] for r in rows if r["mode"] == "block"}):
        rs = sorted([r for r in rows if r["min_experts"] == mn], key=lambda r: r["coverage"])
        ax.plot([r["unique_experts_noisy_block"] for r in rs], [r[key] for r in rs], "o-",
                ms=4, label=f"block, min={mn} (p {rs[0]['coverage']:g}..{rs[-1]['coverage']:g})")
        for r in rs:
          if r["coverage"] in (0.5, 0.9):
            ax.annotate(f"p={r['coverage']:g}", (r["unique_experts_noisy_block"], r[key]),
                        fontsize=6, xytext=(3, -8), textcoords="offset points")
      ax.plot([tok["unique_experts_noisy_block"]], [100.0], "k*", ms=12, label="token routing")
      ax.axhline(DMOE_QUALITY, color="r", ls=":", lw=1, label=f"dMoE: {DMOE_QUALITY}% quality")
      ax.axvline(tok["unique_experts_noisy_block"] / DMOE_REDUCTION, color="r", ls="--", lw=1,
                 label=f"token / {DMOE_REDUCTION:.2f} (dMoE's reduction)")
      ax.set_title(f"{name}: E={m['num_experts']}, top-{m['top_k']}", fontsize=10)
      ax.set_xlabel("unique experts per layer per noisy block")
      ax.set_ylabel(f"% of token routing's {label}")
      ax.grid(alpha=0.3)
      if col == 0:
        ax.legend(fontsize=6, loc="lower right")
  fig.suptitle("dMoE block routing on fixed weights: unique experts vs held-out quality")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(result: dict, out: str) -> None:
  from blockdiff_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  with open(out + ".json", "w", encoding="utf-8") as f:  # Strict JSON: NaN as null.
    json.dump(metrics_writer.finite_or_none(result), f, indent=1, allow_nan=False)
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(result))
  try:
    plot(result, out + ".png")
  except ImportError:
    log("matplotlib missing: no plot")
  log(f"wrote {out}.json, .md, .png")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="quickstart,synthetic,upcycled")
  ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "dmoe_sweep"),
                  help="where the trained workdirs live (trained here when missing)")
  ap.add_argument("--coverages", default="0.5,0.7,0.8,0.9,0.95,0.99,1.0")
  ap.add_argument("--min_sizes", default="k,2k,E/2", help="k, 2k, E/2 or integers")
  ap.add_argument("--batches", type=int, default=4, help="held-out batches per setting")
  ap.add_argument("--batch_size", type=int, default=0, help="0 = the config's")
  ap.add_argument("--noise_samples", type=int, default=2, help="noise draws per batch")
  ap.add_argument("--upcycled_batches", type=int, default=3)
  ap.add_argument("--upcycled_batch_size", type=int, default=4, help="held-out rows per batch")
  ap.add_argument("--upcycled_steps", type=int, default=0, help="0 = MODELS' 12")
  ap.add_argument("--decode_prompts", type=int, default=4,
                  help="prompts decoded at batch 1 (token, p=0.9 min=k, best setting); 0 = off")
  ap.add_argument("--decode_models", default="quickstart,synthetic")
  ap.add_argument("--init_control", type=int, default=1,
                  help="1: also sweep the upcycled model at init (identical experts)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true", help="tiny runs and grid (smoke test)")
  ap.add_argument("--merge", action="store_true",
                  help="update these models in an existing JSON, keep the others")
  ap.add_argument("--rerender", action="store_true", help="Markdown + PNG from the JSON")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "dmoe_coverage_sweep"))
  args = ap.parse_args()
  unknown = [m for m in args.models.split(",") if m not in MODELS]
  if unknown:  # Refused before training the models listed first (minutes each).
    ap.error(f"--models={args.models!r}: unknown {unknown}; known: {list(MODELS)}")
  for flag in ("batches", "noise_samples", "upcycled_batches", "upcycled_batch_size"):
    if getattr(args, flag) < 1:
      ap.error(f"--{flag}={getattr(args, flag)} must be >= 1")
  try:
    coverages = [float(p) for p in args.coverages.split(",")]
  except ValueError:
    ap.error(f"--coverages={args.coverages!r}: comma-separated numbers expected")
  if not all(0.0 < p <= 1.0 for p in coverages):
    ap.error(f"--coverages={args.coverages!r}: each in (0, 1]")
  if not all(m in ("k", "2k", "E/2") or m.isdigit() and int(m) >= 1
             for m in args.min_sizes.split(",")):
    ap.error(f"--min_sizes={args.min_sizes!r}: k, 2k, E/2 or integers >= 1")
  if args.quick:
    if args.out == os.path.join(HERE, "results", "dmoe_coverage_sweep"):
      args.out = "/tmp/dmoe_coverage_sweep_quick"  # A smoke test, not a result.
    args.runs = os.path.join("/tmp", "dmoe_sweep_quick")
    args.models = ",".join(m for m in args.models.split(",") if m in QUICK)
    args.coverages, args.min_sizes, args.batches, args.noise_samples = "0.5,0.9,1.0", "k,E/2", 1, 1
    args.decode_prompts, args.decode_models = min(args.decode_prompts, 1), "quickstart"
  if args.rerender:
    with open(args.out + ".json", encoding="utf-8") as f:
      result = json.load(f)
    for row in (r for m in result["models"].values() for r in m["rows"]):  # null: NaN again.
      row.update({k: float("nan") for k in METRICS if k in row and row[k] is None})
    write(result, args.out)
    return
  t0 = time.time()
  result = {"quick": args.quick, "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
            f"{jax.devices()[0].device_kind}", "jax": jax.__version__,
            "command": " ".join(["python", os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "training": {}, "models": {}}
  if args.merge and os.path.exists(args.out + ".json"):
    # Keep the other models of an earlier run (e.g. the upcycled one swept separately).
    with open(args.out + ".json", encoding="utf-8") as f:
      old = json.load(f)
    result["training"], result["models"] = old["training"], old["models"]
    result["command"] = old["command"] + " ; " + result["command"]
  for name in args.models.split(","):
    try:  # A model that fails to train or sweep is recorded; the next still runs.
      sweep_one(name, args, result, t0)
    except Exception as e:  # pylint: disable=broad-except
      result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
      log(f"{name} failed: {result['errors'][name]}")
    result["seconds"] = time.time() - t0
    write(result, args.out)  # After every model: a long run keeps what it has.
  if result.get("errors"):
    sys.exit(f"models failed: {sorted(result['errors'])} (listed under errors)")


def sweep_one(name: str, args, result: dict, t0: float) -> None:
  """Trains model ``name`` (when its workdir has no checkpoint) and sweeps it into
  ``result``; ``args`` is left as it was, whether or not this raises."""
  config, overrides = MODELS[name]
  if args.quick:
    overrides = overrides + QUICK[name]
  workdir = os.path.join(args.runs, name)
  if name != "upcycled":
    result["training"][name] = train(name, config, workdir, overrides)
    result["models"][name] = sweep_model(name, workdir, args)
    return
  if args.upcycled_steps:
    overrides = overrides + [f"train.steps={args.upcycled_steps}"]
  args = argparse.Namespace(**{**vars(args), "batch_size": args.upcycled_batch_size})
  if args.init_control:
    loaded0 = upcycled_setup(config, overrides, workdir)
    result["models"]["upcycled_at_init"] = init_control(loaded0, workdir, args)
    result["seconds"] = time.time() - t0
    write(result, args.out)
    del loaded0
  if args.upcycled_steps:
    overrides = [o for o in overrides if not o.startswith("train.checkpoint_every=")]
    overrides.append(f"train.checkpoint_every={args.upcycled_steps}")
  result["training"][name] = train(name, config, workdir, overrides)
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  params_loaded = inference.load_for_inference(workdir)
  args.batches = min(args.batches, args.upcycled_batches)
  result["models"][name] = sweep_model(name, workdir, args, params_loaded)

if __name__ == "__main__":
  main()
