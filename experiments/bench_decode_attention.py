"""Benchmarks split-K decode attention against XLA attention for a block against a long cache.

One diffusion block of queries (default 32 tokens, 32 heads, 8 KV heads, head_dim
128, bf16) attends to a KV cache of 4k..131k slots whose last block holds the
queries' own K/V (block-causal visibility). Compared:

* ``pallas_splitk``: ``pallas_kernels.decode_attention`` with its default split count;
* ``pallas_1split``: the same kernel with one split (what split-K buys);
* ``xla``: dense masked attention in XLA (bf16 matmuls, fp32 softmax), as the model's
  XLA path computes it;
* optionally (``--vs_block_attention``) the training kernel
  ``pallas_kernels.block_attention`` on the same problem.

Reports median times, speedups over XLA and the K/V read bandwidth (GB/s, the
bound of decoding). JSON, Markdown and a PNG (time against cache length) go to
experiments/results/.

  python experiments/bench_decode_attention.py --quick  # CPU: XLA timed, kernel checked
  python experiments/bench_decode_attention.py --gpu    # GPU: full shapes

Without a GPU the kernel only runs in the Pallas interpreter: ``--quick`` then times
XLA at small shapes and checks the kernel's output once, untimed.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from pallas_kernels import decode_attention as da
from pallas_kernels.decode_attention import reference as da_reference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="small shapes (CPU-friendly)")
  mode.add_argument("--gpu", action="store_true", help="full shapes; requires a GPU")
  p.add_argument("--cache_lens", type=int, nargs="+", default=[4096, 8192, 32768, 131072])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
  p.add_argument("--block", type=int, default=32, help="query tokens (one diffusion block)")
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--block_k", type=int, default=64, help="kernel cache tile")
  p.add_argument("--num_splits", type=int, default=0, help="0 = the kernel's default")
  p.add_argument("--num_warps", type=int, default=0, help="0 = the kernel's default")
  p.add_argument("--vs_block_attention", action="store_true",
                 help="also time pallas_kernels.block_attention (imports blockdiff_jax)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--out", default=None, help="output path prefix (.json/.md/.png appended); "
                 "default experiments/results/bench_decode_attention_<backend>")
  args = p.parse_args(argv)
  if args.quick:
    args.cache_lens, args.batches = [1024, 4096], [1]
    args.heads, args.kv_heads, args.head_dim = 8, 2, 64
    args.warmup, args.iters = 1, 5
  _check_args(p, args)
  return args


def _check_args(p, args):
  """Refuses bad sizes by flag name before anything compiles (a bad one used to fail
  inside the kernel or in ``statistics.median`` after the first config had run)."""
  for name in ("cache_lens", "batches"):
    bad = [x for x in getattr(args, name) if x < 1]
    if bad:
      p.error(f"--{name}={getattr(args, name)}: every value must be >= 1 (got {bad})")
  for name in ("block", "heads", "kv_heads", "head_dim", "block_k", "iters"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  for name in ("num_splits", "num_warps", "warmup"):
    if getattr(args, name) < 0:
      p.error(f"--{name}={getattr(args, name)} must be >= 0")
  if args.heads % args.kv_heads:
    p.error(f"--heads={args.heads} must be a multiple of --kv_heads={args.kv_heads}")
  # The queries' own block is the cache's last block: a cache shorter than it would give
  # negative query positions.
  if args.block > min(args.cache_lens):
    p.error(f"--block={args.block} must be <= every --cache_lens "
            f"(min {min(args.cache_lens)})")


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


def xla_attention(q, k, v, q_pos, kv_pos, lens, block_size):
  """Dense masked GQA attention as XLA runs it: bf16 matmuls, fp32 softmax."""
  b, tq, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, tq, hkv, h // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                      preferred_element_type=jnp.float32) * d ** -0.5
  mask = da_reference.visibility(q_pos, kv_pos, lens, block_size)[:, None, None]
  logits = jnp.where(mask, logits, -1e30)
  p = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, tq, h, d).astype(q.dtype)


def _problem(batch, cache, args, dtype):
  keys = jax.random.split(jax.random.key(cache + batch), 3)
  h, hkv, d, blk = args.heads, args.kv_heads, args.head_dim, args.block
  q = jax.random.normal(keys[0], (batch, blk, h, d), dtype)
  k = jax.random.normal(keys[1], (batch, cache, hkv, d), dtype)
  v = jax.random.normal(keys[2], (batch, cache, hkv, d), dtype)
  kv_pos = jnp.broadcast_to(jnp.arange(cache, dtype=jnp.int32), (batch, cache))
  q_pos = jnp.broadcast_to(cache - blk + jnp.arange(blk, dtype=jnp.int32), (batch, blk))
  lens = jnp.full((batch,), cache, jnp.int32)
  return q, k, v, q_pos, kv_pos, lens


def _block_attention_fn(args, batch, cache):
  """The training kernel on the same problem (imports the model's mask metadata)."""
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  from pallas_kernels import block_attention as ba  # pylint: disable=g-import-not-at-top
  blk = args.block
  committed = masks.make_meta(jnp.broadcast_to(jnp.arange(cache - blk), (batch, cache - blk)),
                              blk, masks.CLEAN)
  block = masks.make_meta(jnp.broadcast_to(cache - blk + jnp.arange(blk), (batch, blk)),
                          blk, masks.CLEAN)
  kv_meta = committed.concat(block)
  return jax.jit(lambda q, k, v: ba.block_attention(q, k, v, block, kv_meta))


def bench(args, on_gpu):
  """Yields one row per (batch, cache length) as it is measured.

  A config that raises (out of memory at a long cache) is yielded as an error row and
  the others still run.
  """
  dtype = jnp.dtype(args.dtype)
  warps = args.num_warps or None
  splitk = da.DecodeBlockSizes(block_k=args.block_k, num_splits=args.num_splits or None,
                               num_warps=warps)
  one = da.DecodeBlockSizes(block_k=args.block_k, num_splits=1, num_warps=warps)
  configs = [(b, s) for b in args.batches for s in args.cache_lens]
  started = time.perf_counter()
  for n, (batch, cache) in enumerate(configs):
    try:
      row = _bench_one(args, on_gpu, batch, cache, dtype, splitk, one, n == 0)
    except Exception as e:  # pylint: disable=broad-except
      row = dict(batch=batch, cache=cache, error=f"{type(e).__name__}: {e}"[:500])
    elapsed = time.perf_counter() - started
    eta = elapsed / (n + 1) * (len(configs) - n - 1)
    print(f"[{n + 1}/{len(configs)}, {elapsed:.0f}s, ETA {eta:.0f}s] {json.dumps(row)}",
          flush=True)
    yield row


def _bench_one(args, on_gpu, batch, cache, dtype, splitk, one, first):
  """The row of one (batch, cache length)."""
  q, k, v, q_pos, kv_pos, lens = _problem(batch, cache, args, dtype)
  blk = args.block
  kw = dict(q_positions=q_pos, kv_positions=kv_pos, kv_lengths=lens, block_size=blk)
  xla = jax.jit(lambda q, k, v: xla_attention(q, k, v, q_pos, kv_pos, lens, blk))

  def kernel_fn(bs, interpret):
    return jax.jit(lambda q, k, v: da.decode_attention(q, k, v, block_sizes=bs,
                                                       interpret=interpret, **kw))

  layout = da.split_plan(q.shape, k.shape, splitk)
  kv_bytes = 2 * batch * cache * args.kv_heads * args.head_dim * dtype.itemsize
  row = dict(batch=batch, cache=cache, block=blk, heads=args.heads,
             kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
             num_splits=layout.num_splits, chunk=layout.chunk,
             kv_mbytes=kv_bytes / 2**20)
  t = dict(xla=_time(xla, q, k, v, warmup=args.warmup, iters=args.iters))
  ref = xla(q, k, v).astype(jnp.float32)
  if on_gpu:
    t["pallas_splitk"] = _time(kernel_fn(splitk, False), q, k, v, warmup=args.warmup,
                               iters=args.iters)
    t["pallas_1split"] = _time(kernel_fn(one, False), q, k, v, warmup=args.warmup,
                               iters=args.iters)
    out = kernel_fn(splitk, False)(q, k, v)
    if args.vs_block_attention:
      t["block_attention"] = _time(_block_attention_fn(args, batch, cache), q, k, v,
                                   warmup=args.warmup, iters=args.iters)
  elif first:
    out = kernel_fn(splitk, True)(q, k, v)  # Interpreter: a correctness check only.
  else:
    out = None
  if out is not None:
    row["max_abs_err_vs_xla"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
  for name, sec in t.items():
    row[f"ms_{name}"] = sec * 1e3
    # A timer that read 0 (a coarse clock) gives no rate rather than a ZeroDivisionError.
    row[f"gbps_{name}"] = kv_bytes / sec / 1e9 if sec > 0 else None
    if name != "xla":
      row[f"speedup_{name}_vs_xla"] = t["xla"] / sec if sec > 0 else None
  return row


def _fmt(x):
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.3g}"
  return str(x).replace("|", "\\|")  # An error message must not split the table row.


def _write_tables(rows, meta, out):
  """JSON and Markdown of the rows so far (after every row: a run killed by its time
  limit keeps what it measured); returns the Markdown lines."""
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = bench_kernels.strict_json(rows)  # The table too shows "-", not nan.
  out.with_suffix(".json").write_text(
      json.dumps(bench_kernels.strict_json(dict(meta=meta, rows=rows)), indent=1,
                 allow_nan=False))
  cols = ["batch", "cache", "num_splits", "kv_mbytes", "ms_xla", "ms_pallas_splitk",
          "ms_pallas_1split", "ms_block_attention", "speedup_pallas_splitk_vs_xla",
          "speedup_pallas_1split_vs_xla", "speedup_block_attention_vs_xla",
          "gbps_xla", "gbps_pallas_splitk", "max_abs_err_vs_xla", "error"]
  cols = [c for c in cols if any(c in r for r in rows)]
  lines = [f"# Split-K decode attention ({meta['device']}, jax {meta['jax']})", "",
           meta["note"], "",
           f"Query block {meta['args']['block']} tokens, {meta['args']['heads']} heads, "
           f"{meta['args']['kv_heads']} KV heads, head_dim {meta['args']['head_dim']}, "
           f"{meta['args']['dtype']}; block-causal mask; GB/s = K+V bytes / time.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  return lines


def _write(rows, meta, out):
  """Tables, then the plot (skipped, and said so, where matplotlib is not installed)."""
  lines = _write_tables(rows, meta, out)
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"wrote {out}.json/.md (no matplotlib: no plot)", flush=True)
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for batch in dict.fromkeys(r["batch"] for r in rows):
    rs = [r for r in rows if r["batch"] == batch and "ms_xla" in r]  # Not error rows.
    for name in ("xla", "pallas_splitk", "pallas_1split", "block_attention"):
      if rs and f"ms_{name}" in rs[0]:
        ax.plot([r["cache"] for r in rs], [r[f"ms_{name}"] for r in rs], "o-",
                label=f"{name} (batch {batch})")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("KV cache length")
  ax.set_ylabel("ms per call (median)")
  ax.set_title("decode attention: one block against the cache")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out.with_suffix(".png"), dpi=120)
  print(f"wrote {out}.json/.md/.png", flush=True)


def main(argv=None):
  args = _parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if args.gpu and not on_gpu:
    raise SystemExit(f"--gpu given but the JAX backend is {jax.default_backend()!r}")
  note = ("GPU: the Pallas kernel (Triton) and XLA timed." if on_gpu else
          "No GPU: only XLA is timed (small shapes); the kernel ran once in the Pallas "
          "interpreter as a correctness check (interpret mode is not a timing).")
  print(note, flush=True)
  device = str(jax.devices()[0].device_kind)
  meta = dict(time=datetime.datetime.now().isoformat(timespec="seconds"), device=device,
              backend=jax.default_backend(), jax=jax.__version__, note=note,
              command=bench_kernels.command_line("experiments/bench_decode_attention.py", argv),
              # Not --out: a machine path; the files themselves say where they are.
              args={k: v for k, v in vars(args).items() if k != "out"})
  out = pathlib.Path(args.out or RESULTS_DIR / f"bench_decode_attention_{jax.default_backend()}")
  rows = []
  for row in bench(args, on_gpu):
    rows.append(row)
    _write_tables(rows, meta, out)
  _write(rows, meta, out)
  if any("error" in r for r in rows):
    sys.exit("some configs failed (error rows in the results)")


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  main()
