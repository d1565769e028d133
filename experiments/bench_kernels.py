"""Benchmarks the Pallas kernels against their XLA references.

GMM (MoE expert FFN, 7B-MoE shapes): Pallas ``gmm`` vs ``jax.lax.ragged_dot`` vs a
dense matmul of the same FLOPs. Block attention (training layout [x_t ; x_0] and
cache decoding): Pallas ``block_attention`` vs the XLA ``masked_attention``.
Reports median times, ratios and TFLOP/s; "effective" attention TFLOP/s count only
the unmasked (query, key) pairs. Writes JSON and Markdown to experiments/results/.

  python experiments/bench_kernels.py --quick   # CPU: references at small shapes
  python experiments/bench_kernels.py --gpu     # GPU: full shapes, kernels + refs

Without a GPU the Pallas kernels only run in the (very slow) interpreter, so on
CPU this script times the XLA references at small shapes only and says so.
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from pallas_kernels import block_attention as ba
from pallas_kernels import gmm as gmm_lib

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# The XLA attention materializes [B, H, Tq, Tk] fp32 logits (several copies in the
# backward); skip it above this many logits to stay inside GPU memory.
MAX_XLA_LOGITS = 3 * 2**30


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="small shapes (CPU-friendly)")
  mode.add_argument("--gpu", action="store_true", help="full shapes; requires a GPU")
  p.add_argument("--d_model", type=int, default=4096)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--ffn_dim", type=int, default=1408)
  p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
  p.add_argument("--seq_lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                 help="sequence lengths L; training attention runs on 2L tokens")
  p.add_argument("--diff_blocks", type=int, nargs="+", default=[32, 512])
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--no_check", action="store_true", help="skip kernel-vs-reference checks")
  p.add_argument("--out", default=str(RESULTS_DIR / "bench_kernels"),
                 help="output path prefix (.json and .md are appended)")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.experts, args.ffn_dim = 256, 8, 128
    args.tokens, args.seq_lens, args.diff_blocks = [256], [256], [32]
    args.heads, args.kv_heads, args.head_dim = 4, 2, 64
    args.warmup, args.iters = 1, 3
  _check_args(p, args)
  return args


def _check_args(p, args):
  """Refuses bad sizes by flag name before anything compiles (a zero used to surface as
  a shape error or a ``statistics.median`` of no times, after earlier cases had run)."""
  for name in ("tokens", "seq_lens", "diff_blocks"):
    bad = [x for x in getattr(args, name) if x < 1]
    if bad:
      p.error(f"--{name}={getattr(args, name)}: every value must be >= 1 (got {bad})")
  for name in ("d_model", "experts", "top_k", "ffn_dim", "heads", "kv_heads", "head_dim",
               "iters"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  if args.experts < 2:  # Expert 0 is left unused (router imbalance): one must remain.
    p.error(f"--experts={args.experts} must be >= 2")
  if args.heads % args.kv_heads:
    p.error(f"--heads={args.heads} must be a multiple of --kv_heads={args.kv_heads}")


def _time(fn, *args, warmup, iters):
  """Median wall time (s) of ``fn(*args)`` after warmup, synchronising each call."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _tflops(flops, seconds):
  return None if seconds is None else flops / seconds / 1e12


def _max_err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def bench_gmm(args, on_gpu):
  """Yields one row per --tokens value as it is measured."""
  rng = np.random.default_rng(0)
  for tokens in args.tokens:
    m, k, n, g = tokens * args.top_k, args.d_model, args.ffn_dim, args.experts
    # Router-like imbalance: Dirichlet expert loads, one expert unused.
    probs = rng.dirichlet(np.full(g, 2.0))
    probs[0] = 0.0
    sizes = rng.multinomial(m, probs / probs.sum()).astype(np.int32)
    keys = jax.random.split(jax.random.key(tokens), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    dense_w = rhs[1]
    gs = jnp.asarray(sizes)
    flops = 2.0 * m * k * n
    ragged = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s))
    dense = jax.jit(lambda a, b: a @ b)

    def grad_of(f):
      return jax.jit(jax.grad(lambda a, b, s: jnp.sum(f(a, b, s).astype(jnp.float32)),
                              argnums=(0, 1)))

    t = dict(ragged_fwd=_time(ragged, lhs, rhs, gs, warmup=args.warmup, iters=args.iters),
             dense_fwd=_time(dense, lhs, dense_w, warmup=args.warmup, iters=args.iters),
             ragged_fwd_bwd=_time(grad_of(jax.lax.ragged_dot), lhs, rhs, gs,
                                  warmup=args.warmup, iters=args.iters),
             pallas_fwd=None, pallas_fwd_bwd=None)
    row = dict(tokens=tokens, m=m, k=k, n=n, experts=g, max_group=int(sizes.max()),
               empty_groups=int((sizes == 0).sum()), gflop_fwd=flops / 1e9)
    if on_gpu:
      pallas = jax.jit(lambda a, b, s: gmm_lib.gmm(a, b, s))
      t["pallas_fwd"] = _time(pallas, lhs, rhs, gs, warmup=args.warmup, iters=args.iters)
      t["pallas_fwd_bwd"] = _time(grad_of(lambda a, b, s: gmm_lib.gmm(a, b, s)), lhs, rhs,
                                  gs, warmup=args.warmup, iters=args.iters)
      if not args.no_check:
        row["max_abs_err_vs_ragged"] = _max_err(pallas(lhs, rhs, gs), ragged(lhs, rhs, gs))
        ga = grad_of(lambda a, b, s: gmm_lib.gmm(a, b, s))(lhs, rhs, gs)
        gb = grad_of(jax.lax.ragged_dot)(lhs, rhs, gs)
        row["max_abs_err_grad_lhs"] = _max_err(ga[0], gb[0])
        row["max_abs_err_grad_rhs"] = _max_err(ga[1], gb[1])
    row.update({f"ms_{key}": None if v is None else v * 1e3 for key, v in t.items()})
    row["tflops_pallas_fwd"] = _tflops(flops, t["pallas_fwd"])
    row["tflops_ragged_fwd"] = _tflops(flops, t["ragged_fwd"])
    row["tflops_dense_fwd"] = _tflops(flops, t["dense_fwd"])
    row["tflops_pallas_fwd_bwd"] = _tflops(3 * flops, t["pallas_fwd_bwd"])
    row["tflops_ragged_fwd_bwd"] = _tflops(3 * flops, t["ragged_fwd_bwd"])
    if t["pallas_fwd"]:
      row["speedup_vs_ragged_fwd"] = t["ragged_fwd"] / t["pallas_fwd"]
      row["ratio_to_dense_fwd"] = t["pallas_fwd"] / t["dense_fwd"]
      row["speedup_vs_ragged_fwd_bwd"] = t["ragged_fwd_bwd"] / t["pallas_fwd_bwd"]
    print("gmm", json.dumps(row), flush=True)
    yield row


def _visible_pairs(q_meta, kv_meta, spec):
  """Counts unmasked (query, key) pairs, chunked over queries to bound memory."""
  total = 0
  tq = q_meta.shape[1]
  chunk = 1024
  # Per-chunk counts fit int32; the total is summed in Python.
  count = jax.jit(lambda qm: jnp.sum(masks.dense_mask(qm, kv_meta, spec), dtype=jnp.int32))
  for start in range(0, tq, chunk):
    total += int(count(q_meta.slice(start, min(chunk, tq - start))))
  return total


def _attention_layouts(args):
  for length in args.seq_lens:
    for block in args.diff_blocks:
      meta = masks.training_meta(length, block, 1)
      yield dict(layout="train", seq_len=length, diff_block=block), meta, meta
  # Decoding one block against a KV cache of the longest sequence.
  cache = max(args.seq_lens)
  for block in args.diff_blocks:
    cache_meta = masks.make_meta(jnp.arange(cache)[None], block, masks.CLEAN)
    blk = masks.make_meta(cache + jnp.arange(block)[None], block, masks.NOISY)
    yield dict(layout="decode", seq_len=cache, diff_block=block), blk, cache_meta.concat(blk)


def bench_attention(args, on_gpu):
  """Yields one row per attention layout as it is measured."""
  spec = masks.MaskSpec()
  h, hkv, d = args.heads, args.kv_heads, args.head_dim
  for info, q_meta, kv_meta in _attention_layouts(args):
    tq, tk = q_meta.shape[1], kv_meta.shape[1]
    keys = jax.random.split(jax.random.key(tq + tk), 3)
    q = jax.random.normal(keys[0], (1, tq, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, tk, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, tk, hkv, d), jnp.bfloat16)
    pairs = _visible_pairs(q_meta, kv_meta, spec)
    # 2 matmuls of 2*D flops per (query, key, head); backward adds 5 more.
    dense_flops = 4.0 * tq * tk * h * d
    eff_flops = 4.0 * pairs * h * d
    row = dict(info, tq=tq, tk=tk, heads=h, kv_heads=hkv, head_dim=d,
               mask_density=pairs / (tq * tk))

    def xla(q, k, v):
      return ba.masked_attention(q, k, v, q_meta, kv_meta, spec)

    def pallas(q, k, v):
      return ba.block_attention(q, k, v, q_meta, kv_meta, spec=spec)

    def grad_of(f):
      return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                              argnums=(0, 1, 2)))

    fits = h * tq * tk <= MAX_XLA_LOGITS
    t = {}
    t["xla_fwd"] = _time(jax.jit(xla), q, k, v, warmup=args.warmup,
                         iters=args.iters) if fits else None
    t["xla_fwd_bwd"] = _time(grad_of(xla), q, k, v, warmup=args.warmup,
                             iters=args.iters) if fits and info["layout"] == "train" else None
    t["pallas_fwd"] = t["pallas_fwd_bwd"] = None
    if on_gpu:
      t["pallas_fwd"] = _time(jax.jit(pallas), q, k, v, warmup=args.warmup, iters=args.iters)
      if info["layout"] == "train":
        t["pallas_fwd_bwd"] = _time(grad_of(pallas), q, k, v, warmup=args.warmup,
                                    iters=args.iters)
      if fits and not args.no_check:
        row["max_abs_err_vs_xla"] = _max_err(jax.jit(pallas)(q, k, v), jax.jit(xla)(q, k, v))
        if info["layout"] == "train":
          ga, gb = grad_of(pallas)(q, k, v), grad_of(xla)(q, k, v)
          row["max_abs_err_grads"] = [_max_err(a, b) for a, b in zip(ga, gb)]
    if not fits:
      row["xla_skipped"] = f"{h * tq * tk / 2**30:.1f} Gi logits > memory budget"
    row.update({f"ms_{key}": None if val is None else val * 1e3 for key, val in t.items()})
    for key in ("pallas_fwd", "xla_fwd"):
      row[f"tflops_{key}"] = _tflops(dense_flops, t[key])
      row[f"eff_tflops_{key}"] = _tflops(eff_flops, t[key])
    for key in ("pallas_fwd_bwd", "xla_fwd_bwd"):
      row[f"eff_tflops_{key}"] = _tflops(3.5 * eff_flops, t[key])
    if t["pallas_fwd"] and t["xla_fwd"]:
      row["speedup_vs_xla_fwd"] = t["xla_fwd"] / t["pallas_fwd"]
    if t["pallas_fwd_bwd"] and t["xla_fwd_bwd"]:
      row["speedup_vs_xla_fwd_bwd"] = t["xla_fwd_bwd"] / t["pallas_fwd_bwd"]
    print("attention", json.dumps(row), flush=True)
    yield row


def _fmt(x):
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.3g}"
  return str(x)


def _table(rows, cols):
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def strict_json(x):
  """``x`` with NaN/inf floats as None: strict JSON (a NaN kernel error used to be
  written as the non-JSON token NaN)."""
  if isinstance(x, dict):
    return {k: strict_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [strict_json(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _write(out, meta, gmm_rows, att_rows):
  """Writes the JSON and Markdown of the rows so far; returns the Markdown."""
  out.parent.mkdir(parents=True, exist_ok=True)
  gmm_rows, att_rows = strict_json(gmm_rows), strict_json(att_rows)  # The tables show "-", not nan.
  out.with_suffix(".json").write_text(json.dumps(
      strict_json(dict(meta=meta, gmm=gmm_rows, attention=att_rows)), indent=1, allow_nan=False))
  device, note = meta["device"], meta["note"]
  md = [f"# Kernel benchmark ({device}, jax {meta['jax']})", "", note, "",
        f"Command: `{meta['command']}`.", "",
        "## Grouped matmul (bf16 in, fp32 accumulation)", "",
        _table(gmm_rows, ["tokens", "m", "k", "n", "experts", "ms_pallas_fwd",
                          "ms_ragged_fwd", "ms_dense_fwd", "speedup_vs_ragged_fwd",
                          "ratio_to_dense_fwd", "tflops_pallas_fwd", "tflops_ragged_fwd",
                          "tflops_dense_fwd", "ms_pallas_fwd_bwd", "ms_ragged_fwd_bwd",
                          "speedup_vs_ragged_fwd_bwd"]),
        "", "## Block attention (bf16, training layout [x_t ; x_0] and cache decoding)", "",
        "Effective TFLOP/s count only unmasked (query, key) pairs.", "",
        _table(att_rows, ["layout", "seq_len", "diff_block", "tq", "tk", "mask_density",
                          "ms_pallas_fwd", "ms_xla_fwd", "speedup_vs_xla_fwd",
                          "eff_tflops_pallas_fwd", "tflops_pallas_fwd",
                          "ms_pallas_fwd_bwd", "ms_xla_fwd_bwd", "speedup_vs_xla_fwd_bwd",
                          "eff_tflops_pallas_fwd_bwd"]), ""]
  out.with_suffix(".md").write_text("\n".join(md))
  return "\n".join(md)


def command_line(script, argv):
  """The command line, its --out value left out (a machine path, like args' --out)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  kept, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--out":
      skip = True
    elif not a.startswith("--out="):
      kept.append(a)
  return " ".join(["python", script] + kept)


def main(argv=None):
  args = _parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if args.gpu and not on_gpu:
    raise SystemExit(f"--gpu given but the JAX backend is {jax.default_backend()!r}")
  note = ("GPU: Pallas kernels (Triton) and XLA references timed." if on_gpu else
          "No GPU: only the XLA references are timed (small shapes); the Pallas "
          "kernels need a GPU (interpret mode is not a timing).")
  print(note, flush=True)
  device = str(jax.devices()[0].device_kind)
  out = pathlib.Path(args.out)
  meta = dict(time=datetime.datetime.now().isoformat(timespec="seconds"), device=device,
              backend=jax.default_backend(), jax=jax.__version__, note=note,
              command=command_line("experiments/bench_kernels.py", argv),
              # Not --out: its default is this checkout's absolute path, and the files
              # themselves say where they are.
              args={k: v for k, v in vars(args).items() if k != "out"})
  gmm_rows, att_rows = [], []
  md = _write(out, meta, gmm_rows, att_rows)  # Written after every row: a run cut short
  for row in bench_gmm(args, on_gpu):        # keeps what it measured.
    gmm_rows.append(row)
    md = _write(out, meta, gmm_rows, att_rows)
  for row in bench_attention(args, on_gpu):
    att_rows.append(row)
    md = _write(out, meta, gmm_rows, att_rows)
  print(md)
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  main()
