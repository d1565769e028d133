"""Attention cost against context length: full attention vs ChatDLM summary attention.

One attention layer forward over a clean sequence of n tokens (n = 4k .. 131k) with
block-causal visibility:

* ``full``: the materialised-mask XLA path (``attention_ops.masked_attention``) with
  every earlier block visible: n² logits;
* ``summary``: the structured XLA path (``model/summary_attention.py``) with S
  summary slots per block and a window of W blocks: each block against its window
  and the summary bank, n·((W+1)·B + n·S/B) logits. The block size B is the power
  of two that minimises that count (B ≈ √(n·S/(W+1))), as the config would pick it.

For each n: FLOPs from the compiled HLO (``jax.jit(...).lower().compile()
.cost_analysis()``; compiling allocates nothing, so it works at 131k) and, where
memory allows on a CPU, the median wall time of the jitted forward. A least-squares
fit of log(cost) against log(n) gives the exponent (goal for summary: <= 1.5).
JSON, Markdown and a PNG go to experiments/results/summary_attention_cost.*.

  python experiments/summary_attention_cost.py            # ~3 min on a busy 2-core CPU
  python experiments/summary_attention_cost.py --quick    # n = 1k..4k, seconds
"""

import argparse
import datetime
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top

from blockdiff_jax.evaluation import attention_cost

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+",
                 default=[4096, 8192, 16384, 32768, 65536, 131072])
  p.add_argument("--slots", type=int, default=2, help="S: summary slots per block")
  p.add_argument("--window", type=int, default=1, help="W: earlier blocks seen in full")
  p.add_argument("--heads", type=int, default=1)
  p.add_argument("--kv_heads", type=int, default=1)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--max_time_full", type=int, default=16384,
                 help="time full attention up to this n (n² fp32 logits must fit)")
  p.add_argument("--max_time_summary", type=int, default=131072,
                 help="time summary attention up to this n")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="n = 1k, 2k, 4k only")
  p.add_argument("--out", default=str(RESULTS_DIR / "summary_attention_cost"),
                 help="output path prefix (.json/.md/.png appended)")
  args = p.parse_args(argv)
  if args.quick:
    args.lengths = [1024, 2048, 4096]
    if args.out == p.get_default("out"):  # A smoke run is not a result.
      args.out = str(pathlib.Path(tempfile.gettempdir()) / "summary_attention_cost_quick")
  for n in args.lengths:
    if n < 8 or n & (n - 1):
      raise ValueError(f"--lengths: {n} is not a power of two >= 8 (blocks must divide it)")
  if len(set(args.lengths)) != len(args.lengths):
    # A repeated n is one point counted twice: with one distinct n the log-log fit
    # returns a meaningless slope instead of none.
    raise ValueError(f"--lengths: {args.lengths} repeats a length")
  for flag in ("iters", "slots", "window", "heads", "kv_heads", "head_dim"):
    if getattr(args, flag) < 1:
      raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  return args


def measure(n, kind, args):
  """One row of the table (``attention_cost.measure`` with this run's options)."""
  shape = attention_cost.AttentionShape(args.heads, args.kv_heads, args.head_dim,
                                        args.slots, args.window)
  limit = args.max_time_full if kind == "full" else args.max_time_summary
  return attention_cost.measure(n, kind, shape, timed=n <= limit, iters=args.iters)


fit_exponent = attention_cost.fit_exponent


def _fits(rows, args):
  """Fitted exponents of n per kind and cost, over the rows measured so far."""
  fits = {kind: {key: fit_exponent([r for r in rows if r["kind"] == kind], key)
                 for key in ("hlo_flops", "forward_ms")} for kind in ("full", "summary")}
  # Power-of-two blocks balance the window and bank terms exactly only at every
  # other n (B² = n·S/(W+1)); in between the count zigzags. A fit over the
  # balanced lengths alone shows the asymptotic slope without that rounding.
  balanced = [r for r in rows if r["kind"] == "summary" and
              (args.window + 1) * r["block_size"] ** 2 == r["n"] * args.slots]
  fits["summary"]["hlo_flops_balanced_n"] = fit_exponent(balanced, "hlo_flops")
  return fits


def _path(prefix, ext):
  """``prefix`` + ``ext``, appended: Path.with_suffix replaced a dotted tail, so
  ``--out=r/s1.5`` wrote r/s1.json and a run at ``--out=r/s1.25`` overwrote it."""
  return pathlib.Path(f"{prefix}{ext}")


def _write(rows, fits, meta, prefix, plot=True):
  """JSON and Markdown of the rows so far and, with ``plot``, the PNG."""
  _path(prefix, ".json").parent.mkdir(parents=True, exist_ok=True)
  _path(prefix, ".json").write_text(json.dumps(dict(meta=meta, fits=fits, rows=rows),
                                               indent=1, allow_nan=False))
  lines = [f"# Attention cost against context length ({meta['device']}, jax {meta['jax']})",
           "", meta["note"], "",
           "| n | kind | block | logits/head | HLO GFLOP | forward ms |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    ms = f"{r['forward_ms']:.1f}" if "forward_ms" in r else "- (not timed)"
    lines.append(f"| {r['n']} | {r['kind']} | {r['block_size']} | {r['logits_per_head']:.3g} "
                 f"| {r['hlo_flops'] / 1e9:.3g} | {ms} |")
  lines += ["", "Fitted exponent of n (least squares on log-log; goal for summary <= 1.5):", "",
            "| kind | HLO FLOPs | forward time |", "|---|---|---|"]
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  for kind, f in fits.items():
    lines.append(f"| {kind} | {fmt(f['hlo_flops'])} | {fmt(f['forward_ms'])} |")
  lines += ["", "Summary HLO FLOPs fitted over the lengths where the power-of-two block "
            "balances the window and bank terms exactly ((W+1)·B² = n·S): "
            f"{fmt(fits['summary']['hlo_flops_balanced_n'])}."]
  _path(prefix, ".md").write_text("\n".join(lines) + "\n")
  if not plot:
    return

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for kind, marker in (("full", "o"), ("summary", "s")):
    rs = [r for r in rows if r["kind"] == kind]
    slope = fits[kind]["hlo_flops"]  # None with a single length.
    axes[0].loglog([r["n"] for r in rs], [r["hlo_flops"] for r in rs], marker=marker,
                   label=kind + ("" if slope is None else f" (slope {slope:.2f})"))
    rt = [r for r in rs if "forward_ms" in r]
    if rt:
      slope = fits[kind]["forward_ms"]
      axes[1].loglog([r["n"] for r in rt], [r["forward_ms"] for r in rt], marker=marker,
                     label=kind + ("" if slope is None else f" (slope {slope:.2f})"))
  for ax, title in zip(axes, ("HLO FLOPs of one attention layer", "forward time (ms, CPU)")):
    ax.set_xlabel("context length n")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(_path(prefix, ".png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  args = _parse_args(argv)
  meta = dict(
      device=jax.devices()[0].device_kind, jax=jax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      # Not --out: its default is this checkout's absolute path, and the files themselves
      # say where they are.
      args={k: v for k, v in vars(args).items() if k != "out"},
      note=(f"One attention layer forward, batch 1, {args.heads} head(s), {args.kv_heads} KV "
            f"head(s), head_dim {args.head_dim}, fp32, clean block-causal sequence. Summary: "
            f"S={args.slots} slots per block, window W={args.window}, block size = the power "
            "of two minimising (W+1)B + nS/B. FLOPs from the compiled HLO's cost analysis; "
            "times are medians of a few runs on a 2-core CPU shared with other jobs (noisy; "
            "small n are dominated by fixed overheads). Full attention is timed only where "
            "its n x n logits fit in memory."))
  rows = []
  todo = [(n, kind) for n in args.lengths for kind in ("full", "summary")]
  started = time.perf_counter()
  for i, (n, kind) in enumerate(todo):
    rows.append(measure(n, kind, args))
    elapsed = time.perf_counter() - started
    print(f"[{i + 1}/{len(todo)}, {elapsed:.0f}s, ETA "
          f"{elapsed / (i + 1) * (len(todo) - i - 1):.0f}s] {json.dumps(rows[-1])}",
          flush=True)
    # After every row (the plot at the end): the 131k rows take minutes, and a run
    # killed or out of memory there used to leave no file at all.
    _write(rows, _fits(rows, args), meta, args.out, plot=i == len(todo) - 1)
  print(json.dumps(_fits(rows, args), indent=1))


if __name__ == "__main__":
  main()
