"""Cost of one attention layer against context length: full attention vs summary attention.

One forward over a clean sequence of n tokens with block-causal visibility:

* ``full``: the materialised-mask XLA path (``attention_ops.masked_attention``), every
  earlier block visible: n² logits;
* ``summary``: the structured XLA path (``model/summary_attention.py``) with S summary
  slots per block and a window of W blocks: n·((W+1)·B + n·S/B) logits, with B the
  power of two minimising that count (B ≈ √(n·S/(W+1))).

FLOPs come from the compiled HLO (compiling allocates nothing, so 131k works on a
laptop); wall time is measured where asked. ``fit_exponent`` fits log(cost) against
log(n). Used by ``experiments/summary_attention_cost.py`` and the long-context notebook.
"""

import dataclasses
import math
import numbers
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops
from blockdiff_jax.model import summary_attention

KINDS = ("full", "summary")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """One attention layer's shape and the summary layout's options.

  Attributes:
    heads: query heads.
    kv_heads: key/value heads.
    head_dim: width of a head.
    slots: S, summary slots per block.
    window: W, earlier blocks seen in full.
  """

  heads: int = 1
  kv_heads: int = 1
  head_dim: int = 32
  slots: int = 2
  window: int = 1

  def __post_init__(self):
    # Unchecked, heads=0 failed as a KeyError of XLA's cost analysis, head_dim=0 as a
    # ZeroDivisionError, and the "full" kind accepted slots / window the summary
    # layout refuses, so a full-vs-summary table mixed shapes.
    for name in ("heads", "kv_heads", "head_dim", "slots", "window"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"AttentionShape.{name} must be an integer >= 1, got {value!r}")
    if self.heads % self.kv_heads:
      raise ValueError(f"AttentionShape.heads={self.heads} is not a multiple of "
                       f"kv_heads={self.kv_heads}")


def best_block(n: int, slots: int, window: int) -> int:
  """Power-of-two block size minimising (W+1)·B + n·S/B (the logits per query)."""
  cands = [2 ** i for i in range(2, int(math.log2(n)) + 1)]
  return min(cands, key=lambda b: ((window + 1) * b + n * slots / b, b))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def _time(fn, args, iters):
  jax.block_until_ready(fn(*args))  # Warm-up (the compile is already done).
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _problem(n, shape: AttentionShape, slots, block):
  """Metadata and q, k, v shapes of [clean stream of n ; its slots] (slots for summary)."""
  pos = jnp.arange(n, dtype=jnp.int32)[None]
  clean = masks.make_meta(pos, block, masks.CLEAN)
  meta = clean if not slots else clean.concat(masks.summary_slots_meta(clean, block, slots))
  total = meta.shape[1]
  sds = lambda h: jax.ShapeDtypeStruct((1, total, h, shape.head_dim), jnp.float32)
  return meta, (sds(shape.heads), sds(shape.kv_heads), sds(shape.kv_heads))


def measure(n: int, kind: str, shape: AttentionShape = AttentionShape(), timed: bool = False,
            iters: int = 3) -> dict:
  """HLO FLOPs (and with ``timed`` the median forward ms) of one layer at length n.

  Returns:
    ``{"n", "kind", "block_size", "logits_per_head", "hlo_flops", "compile_s"}`` and
    ``"forward_ms"`` when timed.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if n & (n - 1) or n < 8:
    raise ValueError(f"n must be a power of two >= 8 (blocks divide it), got {n}")
  if timed and iters < 1:  # Checked before the compile: no timing has no median.
    raise ValueError(f"iters must be >= 1 when timed, got {iters}")
  block = best_block(n, shape.slots, shape.window)  # Full attention: same blocks, all seen.
  if kind == "full":
    meta, shapes = _problem(n, shape, 0, block)
    fn = jax.jit(lambda q, k, v, m: attention_ops.masked_attention(q, k, v, m, m))
    logits = n * n
  else:
    meta, shapes = _problem(n, shape, shape.slots, block)
    layout = masks.SummaryLayout(1, block, shape.slots)
    spec = masks.MaskSpec(window_blocks=shape.window)
    fn = jax.jit(lambda q, k, v, m: summary_attention.structured_attention(
        q, k, v, m, layout, spec))
    nb = n // block
    logits = n * ((shape.window + 1) * block + nb * shape.slots) + nb * shape.slots * (
        block + shape.slots)
  # Metadata is an argument, not a closure constant: XLA must not fold an n x n mask.
  meta_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), meta)
  start = time.perf_counter()
  compiled = fn.lower(*shapes, meta_shapes).compile()
  row = dict(n=n, kind=kind, block_size=block, logits_per_head=logits,
             hlo_flops=_flops(compiled), compile_s=time.perf_counter() - start)
  if timed:
    keys = jax.random.split(jax.random.key(n), 3)
    qkv = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)]
    row["forward_ms"] = _time(compiled, qkv + [meta], iters) * 1e3
  return row


def fit_exponent(rows, key: str) -> float | None:
  """Least-squares slope of log(row[key]) against log(row["n"]); None with < 2 distinct n.

  Rows without a finite positive ``key`` (not timed, None, NaN, inf, <= 0) are left
  out: the log of such a value is NaN or infinite, and one such point would turn
  the whole slope into NaN instead of the fit over the measured lengths.
  """
  pts = [(r["n"], r[key]) for r in rows if _positive(r.get(key))]
  if len({n for n, _ in pts}) < 2:  # One length repeated has no slope.
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def _positive(value) -> bool:
  """Whether ``value`` is a finite number > 0 (a point a log-log fit can use)."""
  try:
    return bool(np.isfinite(value) and value > 0)
  except TypeError:  # None, or not a number.
    return False
