"""dMoE routing sweeps on fixed weights: unique experts per block against held-out quality.

One trained MoE, many routings: token routing (the baseline) and block routing over a
grid of coverage p and minimum coreset size. Every setting runs the same held-out
batches with the same noise draws, so differences in quality are the routing's alone.

Unique experts are counted per **routing block** (one row, one stream, one block id:
the unit dMoE pools its coreset over), not per forward: the model's own
``unique_experts`` statistic is the union over a whole forward, which for a training
batch of many rows and blocks is every expert under either routing. The per-block
count of the noisy stream of the ``[x_t ; x_0]`` pass is what a decoder with an exact
block cache sees in the forward that denoises that block at the same mask level (same
tokens, same clean context, same routing group); the clean stream's blocks are the
forwards that commit a block to the cache.

The counts come from a flax method interceptor around ``MoEFeedForward``: it re-runs
the layer's router on the layer's own input (so it sees exactly the hidden states of
the routing under test) and adds per-block sums to the layer's statistics, which then
travel through ``nn.scan``/``nn.remat`` like the model's own statistics. The model code
is untouched.
"""

import dataclasses
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.model import build
from blockdiff_jax.model import moe as moe_lib
from blockdiff_jax.model import transformer

Array = Any

# Extra per-layer statistics the interceptor adds (scalars per layer).
# Quality metrics of the objective, each averaged over the tokens it is a mean over.
MODES = ("token", "block")
QUALITY_KEYS = ("nelbo", "masked_ce", "masked_accuracy")
BLOCK_STAT_KEYS = ("noisy_unique_sum", "noisy_coreset_sum", "noisy_groups",
                   "clean_unique_sum", "clean_coreset_sum", "clean_groups")


@dataclasses.dataclass(frozen=True)
class RoutingSetting:
  """One routing of the sweep.

  Attributes:
    mode: "token" or "block".
    coverage: block routing's cumulative share p (ignored for token routing).
    min_experts: block routing's minimum coreset size (ignored for token routing).
  """

  mode: str
  coverage: float = 1.0
  min_experts: int = 0

  def __post_init__(self):
    # Any mode but "token" would route by block (``with_routing``) while ``sweep`` labels
    # the row with no coverage / minimum; a coverage outside (0, 1] would only fail in
    # ``MoEConfig`` once the token baseline has already been evaluated.
    if self.mode not in MODES:
      raise ValueError(f"RoutingSetting: mode must be one of {MODES}, got {self.mode!r}")
    if self.mode == "block":
      _check_coverage(self.coverage)

  @property
  def name(self) -> str:
    if self.mode == "token":
      return "token"
    return f"block p={self.coverage:g} min={self.min_experts}"


def settings_grid(num_experts: int, top_k: int, coverages: Sequence[float],
                  min_sizes: Sequence[int], keep_full: bool = False) -> list[RoutingSetting]:
  """Token routing, then block routing over coverages x minimum sizes.

  Coverages must lie in (0, 1] (checked here, before any evaluation) and repeats are
  dropped. Minimum sizes are clipped to [top_k, num_experts] (``MoEConfig``'s valid
  range) and deduplicated, so e.g. {top_k, 2·top_k, E/2} with E = 4, k = 2 gives {2, 4}. A minimum
  of E keeps every expert in every block, which is token routing exactly (tested), so it
  is dropped unless ``keep_full``.

  Raises:
    ValueError: if ``coverages`` or ``min_sizes`` is empty (the grid would hold the
      token baseline alone), or a coverage is outside (0, 1].
  """
  # An empty axis silently left a "sweep" of the baseline alone.
  for name, values in (("coverages", coverages), ("min_sizes", min_sizes)):
    if not len(values):
      raise ValueError(f"routing_sweep: {name} is empty; give at least one value")
  # Checked before any setting is built: a bad p would otherwise fail only when the
  # sweep reaches it, after the token baseline (and earlier settings) ran.
  for p in coverages:
    _check_coverage(p)
  coverages = list(dict.fromkeys(float(p) for p in coverages))  # As the minimum sizes.
  mins = sorted({min(max(int(m), top_k), num_experts) for m in min_sizes})
  if not keep_full:
    mins = [m for m in mins if m < num_experts]
  out = [RoutingSetting("token")]
  out += [RoutingSetting("block", float(p), m) for m in mins for p in coverages]
  return out


def _check_coverage(p: Any) -> None:
  """Raises ValueError unless ``p`` is a real number in (0, 1] (``MoEConfig``'s range)."""
  if (isinstance(p, bool) or not isinstance(p, numbers.Real)
      or not 0.0 < float(p) <= 1.0):
    raise ValueError(f"routing_sweep: block coverage p must be a number in (0, 1], "
                     f"got {p!r}")


def with_routing(cfg: transformer.TransformerConfig,
                 setting: RoutingSetting) -> transformer.TransformerConfig:
  """The model config with the MoE routed as ``setting`` says."""
  if cfg.moe is None:
    raise ValueError("with_routing: the model has no MoE layers")
  if setting.mode == "token":
    moe = dataclasses.replace(cfg.moe, router_mode="token")
  else:
    moe = dataclasses.replace(cfg.moe, router_mode="block", block_coverage=setting.coverage,
                              block_min_experts=setting.min_experts)
  return dataclasses.replace(cfg, moe=moe)


def per_block_counts(experts: Array, allowed: Array, meta: masks.TokenMeta,
                     num_experts: int) -> dict:
  """Per-block sums of distinct experts used and of coreset sizes, by stream.

  Args:
    experts: chosen experts [B, T, k] (int).
    allowed: block routing's allowed-expert mask [B, T, E] (all True for token routing).
    meta: token metadata [B, T]; tokens with a negative segment id are ignored.
    num_experts: E.

  Returns:
    scalars ``{noisy,clean}_unique_sum`` (sum over blocks of the distinct experts its
    valid tokens use), ``{noisy,clean}_coreset_sum`` (sum over blocks of the allowed
    set's size) and ``{noisy,clean}_groups`` (blocks with at least one valid token).
  """
  b, t, _ = experts.shape
  # One metadata row for the whole batch (as MoEFeedForward accepts) cannot be
  # reshaped to the b*t tokens below.
  meta = meta.broadcast_to((b, t))
  valid = meta.segment_ids >= 0
  used = jnp.any(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) > 0, axis=-2)
  used = (used & valid[..., None]).astype(jnp.int32)
  # The same group ids as moe.block_coreset: every (row, stream, block) its own group.
  groups = (moe_lib.block_group_ids(meta) + (jnp.arange(b) * 2 * t)[:, None]).reshape(-1)
  n = b * 2 * t
  seg_max = lambda v: jax.ops.segment_max(v.reshape(b * t, -1), groups, num_segments=n)
  g_used = seg_max(used)  # [G, E]
  g_allowed = seg_max((allowed & valid[..., None]).astype(jnp.int32))
  g_valid = seg_max(valid.astype(jnp.int32))[:, 0] > 0
  g_noisy = seg_max((meta.stream == masks.NOISY).astype(jnp.int32))[:, 0] > 0
  unique = jnp.sum(jnp.maximum(g_used, 0), -1).astype(jnp.float32)
  coreset = jnp.sum(jnp.maximum(g_allowed, 0), -1).astype(jnp.float32)
  out = {}
  for name, sel in (("noisy", g_valid & g_noisy), ("clean", g_valid & ~g_noisy)):
    out[f"{name}_unique_sum"] = jnp.sum(jnp.where(sel, unique, 0.0))
    out[f"{name}_coreset_sum"] = jnp.sum(jnp.where(sel, coreset, 0.0))
    out[f"{name}_groups"] = jnp.sum(sel).astype(jnp.float32)
  return out


def _interceptor(next_fun, args, kwargs, context):
  """Adds ``per_block_counts`` to every ``MoEFeedForward``'s statistics."""
  if not (isinstance(context.module, moe_lib.MoEFeedForward)
          and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  y, stats = next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["x"]
  meta = args[1] if len(args) > 1 else kwargs["meta"]
  # As MoEFeedForward does: the model accepts one metadata row for the whole batch.
  meta = meta.broadcast_to(x.shape[:2])
  cfg = context.module.cfg
  router = nn.unbox(context.module.get_variable("params", "router"))
  # The layer's own router on the layer's own input: the same decisions it just made.
  _, _, experts, allowed = moe_lib.route(moe_lib.router_logits(x, router), meta, cfg)
  return y, {**stats, **per_block_counts(experts, allowed, meta, cfg.num_experts)}


def make_apply_with_block_stats(model: nn.Module) -> Callable:
  """``build.make_apply(model)`` whose ``aux["moe"]`` also holds ``BLOCK_STAT_KEYS``."""
  apply_fn = build.make_apply(model)

  def fn(params, tokens, meta, **kwargs):
    with nn.intercept_methods(_interceptor):
      return apply_fn(params, tokens, meta, **kwargs)
  return fn


def quality_objective(obj: Any) -> Any:
  """The objective quality is measured with: the unbiased NELBO for BD3-LM (t over the
  whole [eps, 1]), the training objective otherwise (Fast-dLLM v2's masked CE)."""
  if isinstance(obj, losses.BlockDiffusionObjective):
    return likelihood.evaluation_objective(obj)
  return obj


# Each objective's metric for a QUALITY_KEYS entry: the AR baseline and I-DLM log no
# masked_* metrics (their CE and accuracy are over the tokens they score).
_QUALITY_METRICS = {
    "nelbo": ("nelbo",),
    "masked_ce": ("masked_ce", "ce_noisy", "ar_ce"),
    "masked_accuracy": ("masked_accuracy", "noisy_accuracy", "token_accuracy"),
}


def _quality_terms(obj: Any, batch: dict, metrics: dict) -> dict:
  """{key: (mean, tokens it is a mean over)} for QUALITY_KEYS, for any objective.

  BD3-LM's NELBO is per scored token and its masked metrics per masked token. Every
  other objective's metrics are means over the tokens its ``LOSS_TOKENS`` counts
  (Fast-dLLM v2: the masked tokens; its ``masked_fraction`` is of the scorable ones,
  not of the scored ones, so it cannot give the count).
  """
  loss_tokens = metrics[losses.LOSS_TOKENS]
  if isinstance(obj, losses.BlockDiffusionObjective):
    # The fraction is of the clamped scored count, so this is the masked count.
    masked = metrics["masked_fraction"] * jnp.maximum(jnp.sum(losses.maskable(batch)), 1)
    weights = {"nelbo": loss_tokens, "masked_ce": masked, "masked_accuracy": masked}
  else:
    weights = dict.fromkeys(QUALITY_KEYS, loss_tokens)
  out = {}
  for key in QUALITY_KEYS:
    name = next((m for m in _QUALITY_METRICS[key] if m in metrics), None)
    if name is None:
      raise ValueError(f"routing_sweep: the {type(obj).__name__} objective logs none of "
                       f"{_QUALITY_METRICS[key]} for {key!r}")
    out[key] = (metrics[name], weights[key])
  return out


def evaluate_setting(model: transformer.Transformer, params: Any, batches: Sequence[dict],
                     obj: Any, setting: RoutingSetting, seed: int = 0,
                     noise_samples: int = 1) -> dict:
  """Held-out quality and unique experts per block of ``model`` routed as ``setting``.

  Args:
    model: the trained Transformer (its own routing is replaced by ``setting``).
    params: its parameters.
    batches: held-out batches (``tokens``, ``loss_mask``, optional ``segment_ids``).
    obj: the training objective (``diffusion_config.objective``).
    setting: the routing.
    seed: noise seed; draw s of batch i uses ``fold_in(key(seed), i * noise_samples + s)``
      for every setting alike.
    noise_samples: noise draws per batch.

  Returns:
    ``nelbo`` (the objective's reported loss: NELBO nats per scored token for BD3-LM,
    the split-wide ratio ``likelihood.evaluate`` reports under the same seed; masked CE
    for Fast-dLLM v2), ``masked_ce`` and ``masked_accuracy`` (per masked token; the
    drafts' CE and accuracy for I-DLM, the next-token ones for AR),
    per-block means ``unique_experts_noisy_block`` / ``unique_experts_clean_block`` /
    ``coreset_noisy_block`` (over blocks and MoE layers; NaN for a stream the
    objective's forward lacks, as the AR objective's noisy one),
    ``unique_experts_noisy_block_per_layer`` and ``unique_experts_per_forward`` (the
    model's own statistic: the union over the forward).

  Raises:
    ValueError: if ``batches`` is empty, ``noise_samples`` < 1, or no batch scores a
      token.
  """
  # Without a forward the totals stay 0, which would read as "every loss_mask is 0".
  if not batches:
    raise ValueError("routing_sweep: batches is empty; give at least one held-out batch")
  if (isinstance(noise_samples, bool) or not isinstance(noise_samples, numbers.Integral)
      or noise_samples < 1):
    raise ValueError(f"routing_sweep: noise_samples must be an integer >= 1, got "
                     f"{noise_samples!r}")
  routed = transformer.Transformer(with_routing(model.cfg, setting))
  apply_fn = make_apply_with_block_stats(routed)
  obj = quality_objective(obj)
  loss_fn, _ = diffusion_config.loss_functions(obj)

  @jax.jit
  def step(p, batch, rng):
    box = {}

    def capturing(*a, **kw):
      logits, aux = apply_fn(*a, **kw)
      box["moe"] = aux["moe"]
      return logits, aux
    _, metrics = loss_fn(capturing, p, batch, rng, obj)
    moe = box["moe"]
    return (_quality_terms(obj, batch, metrics),
            {k: moe[k] for k in BLOCK_STAT_KEYS + ("unique_experts",)})

  # Token-weighted over every batch and draw (sum of nats / sum of tokens), as
  # likelihood.evaluate: a mean of per-batch ratios would weigh a batch scoring 3
  # tokens like one scoring 300, and count a batch scoring none as a loss of 0.
  totals = {k: [0.0, 0.0] for k in QUALITY_KEYS}
  sums, n = {}, 0
  for i, batch in enumerate(batches):
    for s in range(noise_samples):
      rng = jax.random.fold_in(jax.random.key(seed), i * noise_samples + s)
      m, st = jax.device_get(step(params, batch, rng))
      n += 1
      for k, (mean, weight) in m.items():
        totals[k][0] += float(mean) * float(weight)
        totals[k][1] += float(weight)
      for k, v in st.items():
        sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)  # [layers]
  if not totals["nelbo"][1]:
    raise ValueError("routing_sweep: no scored token in the batches (every loss_mask is 0)")
  out = {k: t[0] / t[1] if t[1] else float("nan") for k, t in totals.items()}
  # A stream with no block (the AR objective's forward has no noisy stream) has no
  # per-block mean: NaN, not 0, which would read as "no expert used".
  mean = lambda total, groups: total / groups if groups else float("nan")
  for stream in ("noisy", "clean"):
    groups = float(np.sum(sums[f"{stream}_groups"]))
    out[f"unique_experts_{stream}_block"] = mean(
        float(np.sum(sums[f"{stream}_unique_sum"])), groups)
    out[f"coreset_{stream}_block"] = mean(float(np.sum(sums[f"{stream}_coreset_sum"])), groups)
  out["unique_experts_noisy_block_per_layer"] = [
      mean(float(u), float(g)) for u, g in zip(sums["noisy_unique_sum"], sums["noisy_groups"])]
  out["unique_experts_per_forward"] = float(np.mean(sums["unique_experts"]) / n)
  out["forwards"] = n
  return out


def sweep(model: transformer.Transformer, params: Any, batches: Sequence[dict], obj: Any,
          settings: Sequence[RoutingSetting], seed: int = 0, noise_samples: int = 1,
          log: Callable[[str], None] | None = None) -> list[dict]:
  """``evaluate_setting`` for every setting; adds ratios against the first (token) one.

  Each row gets ``setting``, ``mode``, ``coverage``, ``min_experts``, the measurements,
  ``expert_reduction`` (token routing's unique experts per noisy block over this
  setting's) and ``quality_pct`` (100 · token NELBO / this NELBO: above 100 is better
  than token routing; the loss is lower-is-better, so the ratio is inverted) and
  ``accuracy_pct`` (100 · this masked-token accuracy / token routing's).

  Raises:
    ValueError: if ``settings`` does not start with token routing (the baseline), or a
      setting is invalid for the model (e.g. a minimum outside [top_k, num_experts]).
  """
  # Every ratio is labelled "of token routing": a grid without it first would silently
  # measure against a block routing instead.
  if not settings or settings[0].mode != "token":
    raise ValueError("sweep: settings must start with RoutingSetting('token'), the "
                     "baseline of expert_reduction / quality_pct / accuracy_pct "
                     "(settings_grid puts it first)")
  # MoEConfig checks each setting (minimum in [top_k, E], an integer) when it is built:
  # built here, a bad setting fails before the token baseline and earlier settings ran.
  for s in settings:
    with_routing(model.cfg, s)
  rows = []
  for i, s in enumerate(settings):
    r = evaluate_setting(model, params, batches, obj, s, seed, noise_samples)
    r.update(setting=s.name, mode=s.mode, coverage=s.coverage if s.mode == "block" else None,
             min_experts=s.min_experts if s.mode == "block" else None)
    base = rows[0] if rows else r
    r["expert_reduction"] = base["unique_experts_noisy_block"] / max(
        r["unique_experts_noisy_block"], 1e-9)
    r["quality_pct"] = 100.0 * base["nelbo"] / r["nelbo"]
    r["accuracy_pct"] = 100.0 * r["masked_accuracy"] / max(base["masked_accuracy"], 1e-9)
    rows.append(r)
    if log:
      log(f"[{i + 1}/{len(settings)}] {s.name}: nelbo {r['nelbo']:.4f} "
          f"({r['quality_pct']:.2f}% of token) unique/block {r['unique_experts_noisy_block']:.2f}"
          f" ({r['expert_reduction']:.2f}x fewer)")
  return rows
