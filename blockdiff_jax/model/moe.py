"""Mixture-of-Experts feed-forward: fp32 router, token or block (dMoE) routing, dropless dispatch.

Dispatch implementations (``MoEConfig.impl``):

* ``ragged_dot``: dropless. Every token is repeated top_k times, the copies are sorted
  by expert, each expert's contiguous group is multiplied by its weights with
  ``jax.lax.ragged_dot``, and the results are unsorted and combined by router weight.
* ``pallas``: the same, with the grouped matmul from ``pallas_kernels.gmm``.
* ``tiled``: dropless too. The copies are scattered into expert groups padded to a
  multiple of ``tile_size`` rows, so every tile belongs to one expert; the three expert
  matmuls then run as one batched matmul over tiles against the gathered expert weights,
  without unpadding in between. On CPUs XLA's ``ragged_dot`` lowering costs about E
  dense matmuls; this path costs the routed FLOPs plus at most E·tile_size padded rows.
* ``dense``: the one-hot reference: every expert runs on every token and the combine
  weights zero out the unselected ones. E times the FLOPs; used by tests.

Block routing (dMoE): within each block of the forward pass (one row, one stream, one
block id) every token's top-k router scores are summed per expert and normalized into
shares; the block keeps the smallest set of experts whose cumulative share reaches
``block_coverage`` (at least ``block_min_experts``), and every token then routes top-k
inside that set.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.model import expert_parallel
from blockdiff_jax.model import layers
from blockdiff_jax.model import sharding
from pallas_kernels import backend

Array = Any

ROUTER_MODES = ("token", "block")
ROUTER_FUNCS = ("softmax", "sigmoid")
MOE_IMPLS = ("ragged_dot", "tiled", "dense", "pallas")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Static MoE options (see configs for the meaning of each field)."""

  num_experts: int
  top_k: int = 2
  expert_dim: int = 256
  shared_expert_dim: int = 0
  shared_expert_gate: bool = False
  router_func: str = "softmax"
  router_mode: str = "token"
  normalize_topk: bool = True
  block_coverage: float = 0.9
  block_min_experts: int = 2
  impl: str = "ragged_dot"
  tile_size: int = 128
  expert_parallel: str = "all_to_all"
  capacity_factor: float = 0.0
  interpret: bool | None = None  # Pallas interpreter; None = unless on a GPU.
  load_balance_weight: float = 0.01
  z_loss_weight: float = 1e-3

  def __post_init__(self):
    layers.require_ints(self, "model.moe", ("num_experts", "top_k", "expert_dim",
                                            "shared_expert_dim", "block_min_experts",
                                            "tile_size"))
    if self.num_experts < 1:
      raise ValueError(f"model.moe.num_experts must be >= 1, got {self.num_experts}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"model.moe.top_k={self.top_k} must be in "
                       f"[1, num_experts={self.num_experts}]")
    if self.router_mode not in ROUTER_MODES:
      raise ValueError(f"model.moe.router_mode must be one of {ROUTER_MODES}, "
                       f"got {self.router_mode!r}")
    if self.router_func not in ROUTER_FUNCS:
      raise ValueError(f"model.moe.router_func must be one of {ROUTER_FUNCS}, "
                       f"got {self.router_func!r}")
    if self.impl not in MOE_IMPLS:
      raise ValueError(f"model.moe.impl must be one of {MOE_IMPLS}, got {self.impl!r}")
    if self.expert_parallel not in expert_parallel.EXPERT_PARALLEL_MODES:
      raise ValueError(f"model.moe.expert_parallel must be one of "
                       f"{expert_parallel.EXPERT_PARALLEL_MODES}, got {self.expert_parallel!r}")
    # NaN would pass a plain < 0 test and mean dropless; inf overflows math.ceil of the
    # expert-parallel capacity.
    if not (self.capacity_factor >= 0 and math.isfinite(self.capacity_factor)):
      raise ValueError(f"model.moe.capacity_factor must be >= 0 and finite (0 = dropless), "
                       f"got {self.capacity_factor}")
    if self.tile_size < 1:
      raise ValueError(f"model.moe.tile_size must be >= 1, got {self.tile_size}")
    # A zero or negative width failed deep in flax (a ZeroDivisionError from the fan-in
    # init, a negative shape) naming no field; ``config.validate`` checks only configs,
    # not a MoEConfig built directly (interop, upcycling, tests).
    if self.expert_dim < 1:
      raise ValueError(f"model.moe.expert_dim must be >= 1, got {self.expert_dim}")
    if self.shared_expert_dim < 0:
      raise ValueError(f"model.moe.shared_expert_dim must be >= 0 (0 = none), "
                       f"got {self.shared_expert_dim}")
    # A NaN or infinite weight turns the auxiliary loss (and every gradient) NaN; a
    # negative one rewards imbalance and large router logits.
    for name in ("load_balance_weight", "z_loss_weight"):
      value = getattr(self, name)
      if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"model.moe.{name} must be >= 0 and finite, got {value}")
    # The gate scales the shared expert; without one there is nothing to gate and the
    # flag was dropped silently (the model built no gate weight).
    if self.shared_expert_gate and not self.shared_expert_dim:
      raise ValueError("model.moe.shared_expert_gate=True needs a shared expert "
                       f"(model.moe.shared_expert_dim > 0), got shared_expert_dim="
                       f"{self.shared_expert_dim}")
    # The coreset options mean nothing to token routing: checking them there would
    # reject valid token-routed layers (a single expert, top_k = E or top_k > 2 with
    # the default block_min_experts of 2).
    if self.router_mode == "block":
      if not 0.0 < self.block_coverage <= 1.0:
        raise ValueError(f"model.moe.block_coverage must be in (0, 1], got {self.block_coverage}")
      if not self.top_k <= self.block_min_experts <= self.num_experts:
        raise ValueError(f"model.moe.block_min_experts={self.block_min_experts} must be in "
                         f"[top_k={self.top_k}, num_experts={self.num_experts}]")


def block_group_ids(meta: masks.TokenMeta) -> Array:
  """Index of each token's routing block within its row, in [0, T) ([B, T] int32).

  Two tokens of a row share an index exactly when they share stream and block id.
  Block ids need not be contiguous (anchored I-DLM blocks sit at arbitrary
  positions), so the index is the rank of the (block, stream) key among the row's
  sorted keys rather than an offset from the row's first block.
  """
  key = meta.block_ids.astype(jnp.int32) * 2 + (meta.stream != masks.NOISY)
  rank = jax.vmap(lambda k: jnp.searchsorted(jnp.sort(k), k, side="left"))
  return rank(key.reshape(-1, key.shape[-1])).reshape(key.shape).astype(jnp.int32)


def block_coreset(scores: Array, meta: masks.TokenMeta, top_k: int, coverage: float,
                  min_experts: int) -> Array:
  """Allowed-expert mask [B, T, E] of dMoE block routing.

  Args:
    scores: router probabilities [B, T, E] (fp32).
    meta: token metadata [B, T] defining the blocks.
    top_k: experts per token.
    coverage: cumulative share p the kept experts must reach.
    min_experts: minimum coreset size.
  """
  b, t, e = scores.shape
  topv, topi = jax.lax.top_k(scores, top_k)
  votes = jnp.sum(jax.nn.one_hot(topi, e, dtype=scores.dtype) * topv[..., None], axis=-2)
  valid = (meta.segment_ids >= 0)[..., None]
  votes = jnp.where(valid, votes, 0.0)
  groups = block_group_ids(meta) + (jnp.arange(b) * 2 * t)[:, None]
  shares = jax.ops.segment_sum(votes.reshape(b * t, e), groups.reshape(-1),
                               num_segments=b * 2 * t)
  shares = shares / jnp.maximum(jnp.sum(shares, axis=-1, keepdims=True), 1e-30)
  order = jnp.argsort(-shares, axis=-1, stable=True)
  sorted_shares = jnp.take_along_axis(shares, order, axis=-1)
  before = jnp.cumsum(sorted_shares, axis=-1) - sorted_shares
  # Keep an expert while the experts ranked above it still fall short of p.
  keep_sorted = (before < coverage - 1e-6) | (jnp.arange(e) < min_experts)
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(keep_sorted.shape[0])[:, None], order].set(keep_sorted)
  return keep[groups.reshape(-1)].reshape(b, t, e)


def route(logits: Array, meta: masks.TokenMeta, cfg: MoEConfig):
  """Router probabilities, chosen experts and combine weights.

  Returns:
    probs [B, T, E], weights [B, T, k], experts [B, T, k] (int32), allowed [B, T, E].
  """
  if cfg.router_func == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    probs = jax.nn.sigmoid(logits)
  if cfg.router_mode == "block":
    coreset = lambda s, m: block_coreset(s, m, cfg.top_k, cfg.block_coverage,
                                         cfg.block_min_experts)
    if sharding.explicit_mesh() is not None:
      # Its segment_sum over the flattened batch has no typed layout under Explicit
      # axes (as the dispatch below): GSPMD partitions it and returns probs' layout.
      coreset = jax.sharding.auto_axes(coreset, out_sharding=jax.typeof(probs).sharding.spec)
    allowed = coreset(probs, meta)
  else:
    allowed = jnp.ones(probs.shape, bool)
  weights, experts = jax.lax.top_k(jnp.where(allowed, probs, -1.0), cfg.top_k)
  if cfg.normalize_topk:
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if cfg.top_k == 1:
      # p / p is the constant 1: its gradient is zero and the router would learn from
      # the aux losses alone. The normaliser's gradient is stopped instead: still 1 in
      # the forward (an upcycled top-1 model equals the dense one), d/dp = 1 / p.
      total = jax.lax.stop_gradient(total)
    weights = weights / jnp.maximum(total, 1e-9)
  return probs, weights, experts.astype(jnp.int32), allowed


def _grouped_matmul(x: Array, w: Array, group_sizes: Array, cfg: MoEConfig) -> Array:
  if cfg.impl == "pallas":
    from pallas_kernels import gmm  # pylint: disable=g-import-not-at-top
    return gmm.gmm(x, w, group_sizes, preferred_element_type=x.dtype, interpret=cfg.interpret)
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=x.dtype)


def expert_ffn(xs: Array, ids: Array, wg: Array, wu: Array, wd: Array,
                      cfg: MoEConfig) -> Array:
  """Grouped SwiGLU over rows. xs [M, D], ids [M] -> [M, D].

  Row m goes through expert ``ids[m]`` of the G experts in the weights' leading
  axis; rows whose id is G or more are void and give zeros (the unfilled slots of
  an expert-parallel receive buffer). Implemented per ``cfg.impl``.
  """
  g = wg.shape[0]
  if cfg.impl == "dense":
    onehot = jax.nn.one_hot(ids, g, dtype=xs.dtype)  # Void rows: all zeros.
    h = nn.silu(jnp.einsum("md,edf->mef", xs, wg)) * jnp.einsum("md,edf->mef", xs, wu)
    return jnp.einsum("mef,efd,me->md", h, wd, onehot)
  if cfg.impl == "tiled":
    return _tiled_ffn(xs, ids, wg, wu, wd, cfg.tile_size)
  ids = jnp.minimum(ids, g)
  order = jnp.argsort(ids, stable=True)  # Void rows last, past sum(group_sizes).
  group_sizes = jnp.bincount(ids, length=g + 1)[:g].astype(jnp.int32)
  x_sorted = xs[order]
  h = nn.silu(_grouped_matmul(x_sorted, wg, group_sizes, cfg)) * _grouped_matmul(
      x_sorted, wu, group_sizes, cfg)
  ys = _grouped_matmul(h, wd, group_sizes, cfg)
  return jnp.zeros_like(ys).at[order].set(ys)


def _tiled_ffn(xs: Array, ids: Array, wg: Array, wu: Array, wd: Array, tile: int) -> Array:
  """``expert_ffn`` over expert groups padded to whole tiles (see module docstring)."""
  m, d = xs.shape
  g = wg.shape[0]
  ids = jnp.minimum(ids, g)
  sizes = jnp.bincount(ids, length=g + 1)[:g]
  padded = (sizes + tile - 1) // tile * tile
  padded_start = jnp.cumsum(padded) - padded
  order = jnp.argsort(ids, stable=True)
  sorted_ids = ids[order]
  rank = jnp.arange(m) - (jnp.cumsum(sizes) - sizes)[jnp.minimum(sorted_ids, g - 1)]
  num_tiles = -(-(m + g * (tile - 1)) // tile)
  # Void rows go one past the last tile and are dropped by the scatter.
  sorted_dest = jnp.where(sorted_ids < g, padded_start[jnp.minimum(sorted_ids, g - 1)] + rank,
                          num_tiles * tile)
  dest = jnp.zeros(m, jnp.int32).at[order].set(sorted_dest.astype(jnp.int32))
  x_pad = jnp.zeros((num_tiles * tile, d), xs.dtype).at[dest].set(xs, mode="drop")
  tile_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_tiles) * tile,
                                          side="right"), 0, g - 1)
  xt = x_pad.reshape(num_tiles, tile, d)
  h = nn.silu(jnp.einsum("tmd,tdf->tmf", xt, wg[tile_expert])) * jnp.einsum(
      "tmd,tdf->tmf", xt, wu[tile_expert])
  y = jnp.einsum("tmf,tfd->tmd", h, wd[tile_expert]).reshape(num_tiles * tile, d)
  return y.at[dest].get(mode="fill", fill_value=0)


def combine(ys: Array, weights: Array) -> Array:
  """Copies [N*k, D] (token-major) weighted by the router: -> [N, D] in ys' dtype.

  The weighted sum runs in fp32: rounding the fp32 router weights to a bf16 ``ys``
  dtype made k >= 3 of them miss a sum of 1 (by up to ~2^-9), so k identical copies
  (an upcycled model at init) did not give the copy back.
  """
  n, k = weights.shape
  return expert_parallel.weighted_copies(ys.reshape(n, k, -1), weights)


def local_experts(x: Array, experts: Array, weights: Array, wg: Array, wu: Array, wd: Array,
                  cfg: MoEConfig) -> Array:
  """Dropless dispatch of every token copy to its expert on this device. x [N, D] -> [N, D]."""
  n, k = experts.shape
  copies = x[jnp.arange(n * k) // k]
  return combine(expert_ffn(copies, experts.reshape(-1), wg, wu, wd, cfg), weights)


def router_logits(x: Array, router: Array) -> Array:
  """fp32 router logits [B, T, E] of tokens x [B, T, D] (the layer's, and its probes').

  HIGHEST: under JAX's default precision an fp32 dot runs as TF32 on NVIDIA GPUs and as
  one bf16 pass on TPUs, so the "fp32" router's logits (and the top-k choice near a tie)
  carried ~3 significant digits. The router is D x E: full precision is cheap.
  """
  return jnp.einsum("btd,de->bte", x.astype(jnp.float32), sharding.replicate_for_use(router),
                    precision=jax.lax.Precision.HIGHEST)


class MoEFeedForward(nn.Module):
  """Top-k MoE SwiGLU layer with an optional shared expert.

  Returns ``(y, stats)`` where stats holds the load-balance loss, the router z-loss,
  tokens per expert and the number of experts used in this forward. Every statistic
  counts the tokens with a segment id >= 0: padding marked by a negative segment id is
  left out, while tokens that are merely unscored (loss mask 0: prompts, the clean
  stream, SFT's EOS tail, which has a segment of its own) are routed and counted.
  """

  cfg: MoEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, meta: masks.TokenMeta):
    cfg = self.cfg
    b, t, d = x.shape
    e, f = cfg.num_experts, cfg.expert_dim
    # One metadata row for the whole batch (masks.TokenMeta.broadcast_to's form) routes
    # the same, but the statistics below then divided B rows' counts by one row's token
    # count: the load-balance loss came out B^2 times too large, the z-loss B times.
    meta = meta.broadcast_to((b, t))
    router = self.param("router", layers.logical_init(
        nn.initializers.normal(stddev=d ** -0.5), ("embed", "expert")), (d, e), jnp.float32)
    init = lambda axes: layers.logical_init(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                         in_axis=-2, out_axis=-1), axes)
    wg = self.param("wi_gate", init(("expert", "embed", "expert_mlp")), (e, d, f), jnp.float32)
    wu = self.param("wi_up", init(("expert", "embed", "expert_mlp")), (e, d, f), jnp.float32)
    wd = self.param("wo", init(("expert", "expert_mlp", "embed")), (e, f, d), jnp.float32)

    logits = router_logits(x, router)
    probs, weights, experts, _ = route(logits, meta, cfg)
    wg, wu, wd = (w.astype(self.dtype) for w in (wg, wu, wd))
    plan = None
    # The Pallas interpreter (CPU) cannot run inside shard_map with varying-axes
    # checks (JAX 0.10/0.11); interpreted kernels keep the GSPMD-partitioned path.
    if cfg.expert_parallel == "all_to_all" and not (
        cfg.impl == "pallas" and backend.resolve_interpret(cfg.interpret)):
      plan = expert_parallel.make_plan((b, t, d), e, cfg.top_k, f, cfg.capacity_factor)
    if plan is not None:
      ffn = lambda *a: expert_ffn(*a, cfg=cfg)
      y, dropped = expert_parallel.all_to_all_experts(
          plan, x.astype(self.dtype), experts, weights, wg, wu, wd, ffn,
          valid=meta.segment_ids >= 0)
    else:
      def dispatch(x, experts, weights, wg, wu, wd):
        return local_experts(x.reshape(b * t, d), experts.reshape(b * t, -1),
                             weights.reshape(b * t, -1), wg, wu, wd, cfg).reshape(b, t, d)
      if sharding.explicit_mesh() is not None:
        # The sort-based dispatch over batch-split tokens has no typed layout under
        # Explicit axes: GSPMD partitions it, and it hands back the tokens' layout.
        dispatch = jax.sharding.auto_axes(dispatch, out_sharding=jax.typeof(x).sharding.spec)
      y = dispatch(x.astype(self.dtype), experts, weights, wg, wu, wd)
      dropped = jnp.zeros((), jnp.float32)
    if cfg.shared_expert_dim:
      shared = layers.SwiGLU(cfg.shared_expert_dim, dtype=self.dtype, name="shared")(x)
      if cfg.shared_expert_gate:  # Qwen2-MoE: sigmoid(x . w) scales the shared expert.
        w = self.param("shared_gate", layers.logical_init(
            nn.initializers.normal(stddev=d ** -0.5), ("embed", None)), (d, 1), jnp.float32)
        shared = shared * jax.nn.sigmoid(jnp.einsum(
            "btd,do->bto", x.astype(jnp.float32), sharding.replicate_for_use(w),
            precision=jax.lax.Precision.HIGHEST)).astype(shared.dtype)
      y = y + shared

    valid = (meta.segment_ids >= 0).astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid), 1.0)
    # Sums rather than einsums over the batch: with Explicit axes a contraction of
    # two batch-split operands has no typed result layout, a reduction does.
    counts = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * valid[..., None, None],
                     axis=(0, 1, 2))
    fraction = counts / (n_valid * cfg.top_k)
    # Switch/GShard's P_e is the mean of a distribution over the experts. Sigmoid scores
    # are not one: unnormalised, E * sum_e f_e P_e was E/2 at perfect balance and fell
    # whenever every logit fell, so the router could lower it without balancing. They
    # are normalised per token first, as DeepSeek-V3's balance loss does.
    balance_probs = probs
    if cfg.router_func == "sigmoid":
      balance_probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-9)
    mean_prob = jnp.sum(balance_probs * valid[..., None], axis=(0, 1)) / n_valid
    z = jax.nn.logsumexp(logits, axis=-1)
    stats = {
        "load_balance_loss": e * jnp.sum(fraction * mean_prob),
        "router_z_loss": jnp.sum(z * z * valid) / n_valid,
        "tokens_per_expert": counts,
        "unique_experts": jnp.sum(counts > 0).astype(jnp.float32),
        # Real tokens' copies an expert-parallel capacity limit dropped, over their copies.
        "dropped_fraction": dropped / (n_valid * cfg.top_k),
    }
    return y.astype(x.dtype), stats


def auxiliary_loss(stats: dict, cfg: MoEConfig) -> tuple[Array, dict]:
  """The one auxiliary loss of the MoE layers and their scalar metrics.

  Args:
    stats: ``MoEFeedForward`` statistics stacked over the MoE layers (axis 0).
    cfg: the weights of the load-balance and router z-losses.

  Returns:
    (weighted load-balance + z-loss averaged over layers, {name: scalar}).
  """
  lb = jnp.mean(stats["load_balance_loss"])
  z = jnp.mean(stats["router_z_loss"])
  counts = stats["tokens_per_expert"]
  metrics = {
      "load_balance_loss": lb,
      "router_z_loss": z,
      "unique_experts": jnp.mean(stats["unique_experts"]),
      "dropped_fraction": jnp.mean(stats["dropped_fraction"]),
      # max/mean expert load: 1 = perfectly balanced.
      "expert_load_max_over_mean": jnp.mean(
          jnp.max(counts, -1) / jnp.maximum(jnp.mean(counts, -1), 1e-9)),
  }
  return cfg.load_balance_weight * lb + cfg.z_loss_weight * z, metrics
