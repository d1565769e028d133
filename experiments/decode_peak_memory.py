r"""Peak memory of one decode forward: full cache against the hierarchical cache.

The hierarchical cache (sampling/hierarchical_cache.py) holds older chunks as rank-r
factors. Its bytes between forwards are what ``--mode=plan`` counts; this measures what
a forward needs on top, from XLA's compiled memory analysis (compile only: no weights
are loaded and nothing runs, so 131k tokens of SmolLM2 fit a laptop). Per length and
cache, for a forward of ``--query`` tokens against the cache at batch 1:

* ``full``: the full ``KVCache``;
* ``hier (expanded first)``: the hierarchical cache with every layer's bank expanded to
  dense K/V before the forward (``hierarchical_cache.dense_view``; what the view did
  before the model read factored banks);
* ``hier (per layer)``: the factored bank handed to the model, each layer's attention
  expanding its own chunks (``model/factored_kv.py``).

  python experiments/decode_peak_memory.py            # SmolLM2-135M, 8k-131k, ~3 min
  python experiments/decode_peak_memory.py --quick    # 2 short lengths, ~30 s
Writes experiments/results/decode_peak_memory.{json,md}.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import logits as logits_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHES = ("full", "hier (expanded first)", "hier (per layer)")


def measure(model, hierarchy: hc.Hierarchy, length: int, query: int) -> list[dict]:
  """Held and scratch bytes of one forward of ``query`` tokens after ``length`` cached."""
  fn = logits_lib.ModelLogits(model)
  params = jax.eval_shape(lambda: build.init_params(model, 0))
  tokens = jax.ShapeDtypeStruct((1, query), jnp.int32)
  pos = jnp.arange(length, length + query, dtype=jnp.int32)[None]
  meta = masks.make_meta(pos, 1, masks.CLEAN)
  rows = []
  for name in CACHES:
    hy = None if name == "full" else hierarchy
    cache = jax.eval_shape(lambda hy=hy: hc.empty_cache(fn.kv_spec, 1, length + query, 1,
                                                        hierarchy=hy))

    def step(p, t, m, c, expand=name == "hier (expanded first)"):
      view = c.attention_view()
      return fn(p, t, m, hc.dense_view(view) if expand else view)[0]

    t0 = time.time()
    mem = jax.jit(step).lower(params, tokens, meta, cache).compile().memory_analysis()
    held = hc.cache_bytes(fn.kv_spec, 1, length + query, hy)
    rows.append({"length": length, "cache": name, "held_bytes": held,
                 "temp_bytes": int(mem.temp_size_in_bytes),
                 "peak_bytes": held + int(mem.temp_size_in_bytes),
                 "compile_s": time.time() - t0})
    print(f"  {length:>7} {name:<22} held {held / 2**20:8.1f} MiB  scratch "
          f"{mem.temp_size_in_bytes / 2**20:8.1f} MiB  ({time.time() - t0:.0f} s)", flush=True)
  return rows


def write(result: dict, out: str) -> None:
  # ``or "."``: a bare ``--out name`` has no folder, and os.makedirs("") raises.
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, allow_nan=False)  # Integers and times: never NaN.
  hy = result["hierarchy"]
  mib = lambda b: f"{b / 2**20:,.1f}"
  lines = [f"# Decode peak memory: full against hierarchical cache ({result['config']}, "
           f"{result['device']}, jax {result['jax']})", "",
           f"Command: `{result['command']}` ({result['seconds']:.0f} s, compile only).", "",
           f"One forward of {result['query']} tokens against a cache of `length` tokens at "
           f"batch 1; hierarchy W{hy['window']}/c{hy['chunk']}/r{hy['rank']}/s{hy['sinks']}. "
           "Held: the cache's arrays between forwards. Scratch: XLA's temporary buffers of "
           "the compiled forward. Peak = held + scratch (weights excluded). Percentages are "
           "of the full cache's peak at the same length.", "",
           "| length | cache | held (MiB) | scratch (MiB) | peak (MiB) | peak vs full |",
           "|---|---|---|---|---|---|"]
  for n in sorted({r["length"] for r in result["rows"]}):
    cells = [r for r in result["rows"] if r["length"] == n]
    if "error" in cells[0]:
      lines.append(f"| {n} | not run: {cells[0]['error']} |")
      continue
    full = next(r for r in cells if r["cache"] == "full")["peak_bytes"]
    for r in cells:
      lines.append(f"| {n} | {r['cache']} | {mib(r['held_bytes'])} | {mib(r['temp_bytes'])} "
                   f"| {mib(r['peak_bytes'])} | {r['peak_bytes'] / full:.1%} |")
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def parse_flags(ap: argparse.ArgumentParser, argv=None):
  """(args, lengths, hierarchy), refused by name before the model is built or compiled."""
  args = ap.parse_args(argv)
  if args.quick:
    args.lengths = "2048,4096"
    if args.out == ap.get_default("out"):
      args.out = "/tmp/decode_peak_memory_quick"
  try:
    lengths = [int(x) for x in args.lengths.split(",")]
  except ValueError:
    ap.error(f"--lengths={args.lengths!r}: comma-separated integers expected")
  if min(lengths) < 1 or len(set(lengths)) != len(lengths):
    ap.error(f"--lengths={args.lengths!r}: integers >= 1, each once")
  if args.query < 1:
    ap.error(f"--query={args.query} must be >= 1")
  try:
    window, chunk, rank, sinks = (int(x) for x in args.hierarchy.split(":"))
    hierarchy = hc.Hierarchy(window=window, chunk=chunk, rank=rank, sinks=sinks)
  except (ValueError, TypeError) as e:
    ap.error(f"--hierarchy={args.hierarchy!r}: window:chunk:rank:sinks expected ({e})")
  return args, lengths, hierarchy


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2.py"))
  ap.add_argument("--lengths", default="8192,32768,131072")
  ap.add_argument("--hierarchy", default="2:256:6:1", help="window:chunk:rank:sinks")
  ap.add_argument("--query", type=int, default=32, help="tokens per forward (a block)")
  ap.add_argument("--quick", action="store_true", help="2 short lengths (smoke test)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_peak_memory"))
  args, lengths, hierarchy = parse_flags(ap, argv)
  config = config_lib.from_file(args.config)
  model, _ = build.build_model(config)
  t0 = time.time()
  result = {"config": os.path.relpath(args.config, ROOT),
            "device": jax.devices()[0].device_kind,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
            "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "query": args.query, "hierarchy": hierarchy.__dict__, "rows": []}
  for n in lengths:
    try:  # A length that fails to compile (out of memory) is a row; the others still run.
      result["rows"] += measure(model, hierarchy, n, args.query)
    except Exception as e:  # pylint: disable=broad-except
      result["rows"].append({"length": n, "error": f"{type(e).__name__}: {e}"})
      print(f"  {n:>7} failed: {result['rows'][-1]['error']}", flush=True)
    result["seconds"] = time.time() - t0
    write(result, args.out)  # After every length: a killed run keeps what it measured.
  if any("error" in r for r in result["rows"]):
    sys.exit("some lengths failed (error rows in the results)")


if __name__ == "__main__":
  main()
