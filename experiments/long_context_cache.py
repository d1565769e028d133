r"""Hierarchical KV cache on a real model: memory at 131k, next-token KL, passkey accuracy.

For SmolLM2-135M-Instruct (bundled; any AR config works) and each hierarchy
``window:chunk:rank`` (exact ring of (W+1)·chunk positions, rank-r factors of older
chunks; sampling/hierarchical_cache.py), in one run:
* KV memory against context length up to 131,072 tokens, hierarchical against full
  (the byte counts of the caches' arrays, as ``--mode=plan`` prints them);
* fidelity: KL(full || hierarchical) of next-token distributions on standard-library
  text, the first n - query tokens cached, the last ``query`` teacher-forced;
* passkey and key-value recall (data/long_context.py) by greedy AR decoding with the
  full cache and with each hierarchy, against length and needle depth.

  python experiments/long_context_cache.py            # ~30 min on a 2-core CPU
  python experiments/long_context_cache.py --quick    # ~3 min
Writes experiments/results/long_context_cache.{json,md,png}.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax

from blockdiff_jax import config as config_lib
from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import long_context as tasks_lib
from blockdiff_jax.evaluation import long_context
from blockdiff_jax.model import kv_memory
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import layout

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import long_context_retrieval as retrieval  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_hierarchy(text: str) -> hc.Hierarchy:
  """``window:chunk:rank[:sinks]`` (sinks default 1)."""
  parts = [int(x) for x in text.split(":")]
  if len(parts) not in (3, 4):
    raise ValueError(f"--hierarchies entry {text!r} is not window:chunk:rank[:sinks]")
  return hc.Hierarchy(*parts)


def name(hy: hc.Hierarchy | None) -> str:
  return "full" if hy is None else f"W{hy.window}/c{hy.chunk}/r{hy.rank}/s{hy.sinks}"


def memory_rows(cfg, hierarchies, lengths):
  shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype, 1)
  rows = []
  for n in lengths:
    full = kv_memory.full_cache_bytes(*shape, n)
    for hy in [None] + list(hierarchies):
      b = full if hy is None else kv_memory.hierarchical_cache_bytes(
          *shape, n, hy.window, hy.chunk, hy.rank, hy.sinks)
      rows.append({"length": n, "cache": name(hy), "bytes": b, "fraction": b / full})
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, every list parsed and refused by name before the model loads.

  Adds ``hierarchy_list``, ``length_list``, ``depth_list``, ``task_list``,
  ``fidelity_list`` and ``memory_list`` to the namespace.
  """
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "smollm2.py"))
  ap.add_argument("--hierarchies", default="2:256:6,2:64:4,2:64:16,2:64:16:0",
                  help="window:chunk:rank[:sinks], comma-separated")
  ap.add_argument("--lengths", default="512,1024,2048", help="retrieval prompt lengths")
  ap.add_argument("--depths", default="0.1,0.5,0.9")
  ap.add_argument("--per_cell", type=int, default=1)
  ap.add_argument("--tasks", default="passkey,kv_recall")
  ap.add_argument("--fidelity_lengths", default="1024,2048")
  ap.add_argument("--query", type=int, default=64, help="teacher-forced positions for KL")
  ap.add_argument("--memory_lengths", default="4096,8192,16384,32768,65536,131072")
  ap.add_argument("--quick", action="store_true", help="small grid (smoke test)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "long_context_cache"))
  args = ap.parse_args(argv)
  if args.quick:
    args.lengths, args.depths, args.per_cell = "512,1024", "0.5", 1
    args.fidelity_lengths, args.tasks = "1024", "passkey"
    if args.out == ap.get_default("out"):  # A smoke run is not a result.
      args.out = os.path.join(tempfile.gettempdir(), "long_context_cache_quick")

  numbers = lambda flag, cast, ok, want: retrieval.numbers(ap, args, flag, cast, ok, want)

  try:
    args.hierarchy_list = [parse_hierarchy(h) for h in args.hierarchies.split(",")]
  except (ValueError, TypeError) as e:
    ap.error(f"--hierarchies={args.hierarchies!r}: {e}")
  try:
    args.task_list = [tasks_lib.validate_task(t) for t in args.tasks.split(",")]
  except ValueError as e:
    ap.error(f"--tasks={args.tasks!r}: {e}")
  if args.per_cell < 1 or args.query < 1:
    ap.error(f"--per_cell={args.per_cell} and --query={args.query} must be >= 1")
  args.length_list = numbers("lengths", int, lambda n: n >= 1, "integers >= 1")
  args.depth_list = numbers("depths", float, lambda d: 0.0 <= d <= 1.0, "fractions in [0, 1]")
  # The KL needs cached positions before the ``query`` teacher-forced ones.
  args.fidelity_list = numbers("fidelity_lengths", int, lambda n: n > args.query,
                               f"integers > --query ({args.query})")
  args.memory_list = numbers("memory_lengths", int, lambda n: n >= 1, "integers >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  hierarchies, lengths = args.hierarchy_list, args.length_list
  config = config_lib.from_file(args.config)
  config.sample.max_len = max(lengths) + 16
  _, model, tok, params = inference.load_for_inference(tempfile.mkdtemp(), config)
  cfg = model.cfg
  result = {"config": os.path.relpath(args.config, os.path.join(HERE, "..")),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "hierarchies": [name(h) for h in hierarchies], "command": " ".join(sys.argv),
            "fidelity": [], "retrieval": [], "errors": []}
  result["memory"] = memory_rows(cfg, hierarchies, args.memory_list)

  t0 = time.time()

  def save(final=False):  # After every phase: a killed run keeps what it measured.
    result["seconds"] = time.time() - t0
    write(result, args.out, final)

  def failed(phase, e):  # One failing cell is recorded; the others still run.
    result["errors"].append({"phase": phase, "error": f"{type(e).__name__}: {e}"})
    print(f"{phase} failed: {result['errors'][-1]['error']}", flush=True)

  save()
  with inference.inference_context(config):
    haystack = tasks_lib.load_haystack(tok, 2 * max(args.fidelity_list))
    for n in args.fidelity_list:
      print(f"fidelity at {n} tokens ...", flush=True)
      try:
        for hy, f in zip(hierarchies, long_context.cache_fidelity(
            model, params, haystack[:n], n - args.query, hierarchies)):
          result["fidelity"].append({
              "length": n, "cache": name(hy), "kl": f.kl, "kl_max": f.kl_max,
              "top1_agreement": f.top1_agreement, "compressed_fraction": f.compressed_fraction})
          print(f"  {name(hy)}: KL {f.kl:.4f} top-1 {f.top1_agreement:.3f} "
                f"({f.compressed_fraction:.0%} of the context factorised)", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        failed(f"fidelity at {n} tokens", e)
      save()

    examples = tasks_lib.make_suite(tok, lengths=lengths, depths=args.depth_list,
                                    per_cell=args.per_cell, tasks=args.task_list)
    base = layout.DecodeOptions(block_size=1, mask_id=tok.mask_id, eos_id=tok.eos_id,
                                token_shift=True)
    total = len(examples) * (1 + len(hierarchies))
    done = [0]
    start = time.time()

    def progress(i, row):
      done[0] += 1
      rate = done[0] / (time.time() - start)
      print(f"  [{done[0]}/{total}] {row['task']} n={row['length']} d={row['depth']} "
            f"{'hit ' if row['hit'] else 'miss'} {row['completion']!r} "
            f"({rate * 60:.1f}/min, ETA {(total - done[0]) / rate:.0f} s)", flush=True)

    for hy in [None] + hierarchies:
      print(f"retrieval, cache {name(hy)} ...", flush=True)
      opt = base.__class__(**{**base.__dict__, "kv_hierarchy": hy})
      try:
        rows = [{"cache": name(hy), **row} for row in long_context.retrieval(
            model, params, tok, examples, opt, on_example=progress)]
      except Exception as e:  # pylint: disable=broad-except
        failed(f"retrieval with cache {name(hy)}", e)
      else:
        result["retrieval"] += rows
      save()
  save(final=True)
  if result["errors"]:
    sys.exit(f"{len(result['errors'])} cells failed (listed under errors in the results)")


def write(result, out, final=True):
  """``out``.json (strict), .md and, when ``final``, .png of what ``result`` holds so far."""
  # ``or "."``: a bare ``--out name`` has no folder, and os.makedirs("") raises.
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(metrics_writer.finite_or_none(result), f, indent=2, allow_nan=False)
  caches = ["full"] + result["hierarchies"]
  lines = [f"# Hierarchical KV cache on {result['config']} ({result['device']}, "
           f"jax {result['jax']})", "",
           f"Command: `{result['command']}` ({result['seconds'] / 60:.1f} min).", "",
           "Cache `W{window}/c{chunk}/r{rank}/s{sinks}`: exact K/V for the last W whole "
           "chunks (and the one being filled) and for the first `sinks` chunks, rank-r "
           "factors (keys with RoPE undone) per layer, KV head and chunk for the others.",
           "", "## KV memory (bytes held between forwards, batch 1)", "",
           "| length | " + " | ".join(caches) + " |", "|---|" + "---|" * len(caches)]
  mem = result["memory"]
  for n in sorted({r["length"] for r in mem}):
    cells = [r for r in mem if r["length"] == n]
    lines.append(f"| {n} | " + " | ".join(
        f"{r['bytes'] / 2**20:.1f} MiB ({r['fraction']:.1%})" for r in cells) + " |")
  lines += ["", "## Next-token fidelity against the full cache", "",
            "| length | cache | factorised | KL (nats) | max KL | top-1 agreement |",
            "|---|---|---|---|---|---|"]
  for r in result["fidelity"]:
    lines.append(f"| {r['length']} | {r['cache']} | {r['compressed_fraction']:.0%} | "
                 f"{r['kl']:.4f} | {r['kl_max']:.3f} | {r['top1_agreement']:.3f} |")
  ret = result["retrieval"]
  lines += ["", "## Retrieval accuracy (exact match, greedy AR)", "",
            "| task | length | " + " | ".join(caches) + " |",
            "|---|---|" + "---|" * len(caches)]
  for task in sorted({r["task"] for r in ret}):
    for n in sorted({r["length"] for r in ret}):
      cells = [long_context.accuracy(ret, task=task, length=n, cache=c) for c in caches]
      lines.append(f"| {task} | {n} | " + " | ".join(
          f"{a:.2f} (n={k})" if k else "-" for a, k in cells)
                   + " |")
  lines += ["", "By depth (all tasks and lengths):", "",
            "| depth | " + " | ".join(caches) + " |", "|---|" + "---|" * len(caches)]
  for d in sorted({r["depth"] for r in ret}):
    lines.append(f"| {d} | " + " | ".join(
        _rate(long_context.accuracy(ret, depth=d, cache=c)) for c in caches) + " |")
  if result.get("errors"):
    lines += ["", "## Not run", ""] + [f"- {e['phase']}: {e['error']}" for e in result["errors"]]
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  if not final:
    return
  print("\n".join(lines))
  try:
    plot(result, caches, out + ".png")
  except ImportError:
    print("matplotlib missing: no plot")


def _rate(accuracy: tuple[float, int]) -> str:
  """An ``accuracy`` cell: "-" where no row matched (a cache whose retrieval failed)."""
  return f"{accuracy[0]:.2f}" if accuracy[1] else "-"


def plot(result, caches, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for c in caches:
    rows = [r for r in result["memory"] if r["cache"] == c]
    axes[0].loglog([r["length"] for r in rows], [r["bytes"] / 2**20 for r in rows], "o-",
                   label=c)
    rows = [r for r in result["fidelity"] if r["cache"] == c]
    if rows:
      axes[1].semilogy([r["length"] for r in rows], [max(r["kl"], 1e-6) for r in rows],
                       "o-", label=c)
    lengths = sorted({r["length"] for r in result["retrieval"]})
    axes[2].plot(lengths, [long_context.accuracy(result["retrieval"], length=n, cache=c)[0]
                           for n in lengths], "o-", label=c)
  axes[0].set(xlabel="context length (tokens)", ylabel="KV cache (MiB)", title="memory")
  axes[1].set(xlabel="context length", ylabel="KL(full || cache), nats",
              title="next-token fidelity")
  axes[2].set(xlabel="prompt length", ylabel="exact match", title="passkey / KV recall",
              ylim=(-0.05, 1.05))
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


if __name__ == "__main__":
  main()
