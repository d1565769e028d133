"""Expert parallelism: token copies travel to their experts' shards by all-to-all.

When the mesh splits the MoE expert axis (``mesh.expert > 1``) and
``moe.expert_parallel = "all_to_all"``, a MoE layer runs its dispatch inside a
``shard_map`` over the whole mesh. Each device holds the tokens of its batch
shard and ``E / ep`` experts, and:

1. sorts its ``N·k`` token copies by expert; since every shard holds a
   contiguous range of experts, this also groups them by destination shard;
2. writes each copy into a send buffer ``[ep, C, D]`` at (destination shard,
   rank within that destination), with the copy's local expert id beside it;
3. ``all_to_all`` over the expert axes: row ``i`` of the receive buffer now
   holds the copies shard ``i`` sent here;
4. runs its local experts on the received rows (``moe.expert_ffn``; unfilled
   slots carry a void id: the grouped matmuls of ``ragged_dot``/``pallas`` on a
   GPU skip them, but sorting and moving the buffer still costs O(ep·C));
5. sends the results back with the inverse ``all_to_all`` and combines each
   token's k copies with its router weights.

Dropless by default. ``C``, the slots one shard reserves for one sender, is the
worst case ``N · min(k, E/ep)`` (a token's k experts are distinct, so at most
``min(k, E/ep)`` of them live on one shard) unless ``moe.capacity_factor`` > 0
sets ``C = ceil(capacity_factor · N·k / ep)`` (GShard-style): a shard's copies
past ``C``, in token order, are dropped (they add zero) and counted in the
``dropped_fraction`` statistic. Padding copies (``segment_ids < 0``) never
travel: they take no slot, count as neither kept nor dropped, and give zeros, so a
padded batch drops no more real copies than its real tokens alone would. The capacity applies only where copies travel
(tokens split over ``ep > 1`` shards); one device and replicated tokens (one-prompt
sampling) stay dropless, so train and inference can differ when it is set.
The dropless buffer holds ``ep · min(k, E/ep) / k`` times the average load, the
memory price of never dropping; a factor of 1.25-2 is the usual trade. We use a fixed-size ``all_to_all`` rather than ``ragged_all_to_all`` because the
latter has no CPU lowering in XLA (tests run on simulated CPU devices).

Weights sharded over other axes are handled like ZeRO-3/Megatron would: axes
that split ``embed`` (``fsdp``) are all-gathered as the weights enter the
``shard_map`` (their gradient is reduce-scattered on the way out), and axes that
split ``expert_mlp`` (``tensor``) stay split, each device computing a partial sum
that one ``psum`` completes. (Gathering outside rather than with ``all_gather``
inside keeps the gathered weights typed as replicated, which ``shard_map``'s
varying-axes check needs when the tokens are replicated over ``fsdp``.)

Where the tokens are not split over the expert axes (one prompt while
sampling), every expert shard applies its experts to all tokens and a ``psum``
adds the shards' parts; without an expert axis the same ``shard_map`` is a
token-local dropless dispatch. Either way no sort runs over a sharded axis.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockdiff_jax.model import sharding
from pallas_kernels import manual_axes

Array = Any
P = jax.sharding.PartitionSpec

EXPERT_PARALLEL_MODES = ("all_to_all", "gather")
GATE_AXES = ("expert", "embed", "expert_mlp")
DOWN_AXES = ("expert", "expert_mlp", "embed")


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan:
  """How one MoE layer's dispatch is laid out on the mesh (static, from shapes and rules).

  Attributes:
    ep_axes: mesh axes that split the experts (the all-to-all runs over them).
    ep: number of expert shards.
    token_spec: spec of the tokens [B, T, D] (and of the routing [B, T, k]).
    gate_spec: spec the gate and up weights [E, D, F] enter the ``shard_map`` with:
      split over the experts and ``expert_mlp``; ``embed`` whole (all-gathered
      at use as ZeRO-3 does; the transpose reduce-scatters the gradient).
    down_spec: the same for the down weights [E, F, D].
    hidden_axes: axes splitting ``expert_mlp`` inside (a ``psum`` after the
      combine completes the partial sums); empty when those axes also split the
      tokens, and then the hidden units are gathered too.
    tokens_split: whether the tokens are split over ``ep_axes`` (all-to-all) or
      replicated over them (each shard applies its experts to all tokens, a
      ``psum`` adds the shards' parts).
    capacity: slots per (sender, receiver) pair.
  """

  ep_axes: tuple[str, ...]
  ep: int
  token_spec: P
  gate_spec: P
  down_spec: P
  hidden_axes: tuple[str, ...]
  tokens_split: bool
  capacity: int


def make_plan(x_shape: tuple[int, ...], num_experts: int, top_k: int, expert_dim: int,
              capacity_factor: float) -> ExpertParallelPlan | None:
  """The layout of an all-to-all dispatch under the current mesh and rules, or None.

  None means: no mesh or rules are active, or the rules give a layout this path
  does not handle (``embed`` of the tokens split, the tokens split over some
  expert axes but not all); the caller then uses the local dispatch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return None
  b, t, d = x_shape
  gate_spec = sharding.logical_spec(GATE_AXES, (num_experts, d, expert_dim), mesh)
  down_spec = sharding.logical_spec(DOWN_AXES, (num_experts, expert_dim, d), mesh)
  token_spec = sharding.logical_spec(sharding.TOKEN_AXES, x_shape, mesh)
  ep_axes = sharding.axes_of(gate_spec[0])
  if sharding.axes_of(down_spec[0]) != ep_axes:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  ep_axes = tuple(a for a in ep_axes if sizes[a] > 1)  # Size-1 axes exchange nothing.
  token_axes = set(sharding.axes_of(token_spec[0])) | set(sharding.axes_of(token_spec[1]))
  if sharding.axes_of(token_spec[2]):
    return None
  if set(ep_axes) & token_axes and not set(ep_axes) <= token_axes:
    return None  # Tokens split over some expert axes but not all: no exact layout.
  hidden_axes = sharding.axes_of(gate_spec[2])
  if sharding.axes_of(down_spec[1]) != hidden_axes:
    return None
  if set(hidden_axes) & token_axes:
    hidden_axes = ()
  ep_entry = gate_spec[0]
  hidden_entry = None if not hidden_axes else gate_spec[2]
  ep = math.prod(sizes[a] for a in ep_axes)
  n_local = b * t // math.prod(sizes[a] for a in token_axes)
  worst = n_local * min(top_k, num_experts // ep)
  capacity = worst
  if capacity_factor > 0:
    capacity = min(worst, max(1, math.ceil(capacity_factor * n_local * top_k / ep)))
  return ExpertParallelPlan(
      ep_axes=ep_axes, ep=ep, token_spec=token_spec,
      gate_spec=P(ep_entry, None, hidden_entry), down_spec=P(ep_entry, hidden_entry, None),
      hidden_axes=hidden_axes, tokens_split=bool(ep_axes) and set(ep_axes) <= token_axes,
      capacity=capacity)


@jax.checkpoint
def weighted_copies(copies: Array, weights: Array) -> Array:
  """sum_k weights[n, k] * copies[n, k, :] -> [N, D] in the copies' dtype, summed in fp32.

  Rounded to bf16 copies' dtype, the fp32 router weights of k >= 3 experts miss a sum of
  1 (by up to ~2^-9), so k identical copies (an upcycled model at init) did not give the
  copy back. Rematerialized: the backward keeps the bf16 copies, not an fp32 twice their
  size.
  """
  return jnp.einsum("nkd,nk->nd", copies.astype(jnp.float32), weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(copies.dtype)


def all_to_all_experts(plan: ExpertParallelPlan, x: Array, experts: Array, weights: Array,
                       wg: Array, wu: Array, wd: Array, ffn: Callable[..., Array],
                       valid: Array | None = None) -> tuple[Array, Array]:
  """MoE dispatch with expert parallelism (see the module docstring).

  Args:
    plan: from ``make_plan``.
    x: tokens [B, T, D] (global view).
    experts: chosen experts [B, T, k] (int32).
    weights: router combine weights [B, T, k].
    wg, wu: gate/up weights [E, D, F]; wd: down weights [E, F, D].
    ffn: ``ffn(rows, ids, wg, wu, wd) -> [M, D]``, the local grouped SwiGLU, void
      rows (id >= local experts) giving zeros (``moe.expert_ffn``).
    valid: [B, T] bool, False at padding (whose copies are not sent and give zeros
      where tokens travel); None means every token is real.

  Returns:
    y [B, T, D] and the number of dropped copies of real tokens (a float scalar).
  """
  c, ep, axes = plan.capacity, plan.ep, plan.ep_axes
  row_spec = P(*plan.token_spec[:2])

  def _exchange(x, flat, real, k, e_local, wg, wu, wd):
    """Copies to their experts' shards and back: -> results [N*k, D], number dropped."""
    n, d = x.shape
    # Grouped by destination shard, in token order within each: a capacity limit
    # then drops a shard's latest copies (GShard's position order) rather than
    # starving its highest-numbered experts. The receiver groups by expert itself.
    # Padding copies get destination ep (past every shard): they sort last and take
    # no slot, so they cannot push a real token's copy past the capacity.
    dest_of = jnp.where(real, flat // e_local, ep)
    order = jnp.argsort(dest_of, stable=True)
    sorted_experts = flat[order]
    dest = dest_of[order]
    counts = jnp.bincount(dest_of, length=ep + 1)
    rank = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[dest]
    travels = dest < ep
    kept = travels & (rank < c)
    slot = jnp.where(kept, dest * c + rank, ep * c)  # Out of range: dropped by the scatter.
    send_x = jnp.zeros((ep * c, d), x.dtype).at[slot].set(x[order // k], mode="drop")
    send_ids = jnp.full((ep * c,), e_local, jnp.int32).at[slot].set(
        (sorted_experts % e_local).astype(jnp.int32), mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axes, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, axes, 0, 0, tiled=True)
    y_recv = ffn(recv_x, recv_ids, wg, wu, wd)
    y_back = jax.lax.all_to_all(y_recv, axes, 0, 0, tiled=True)
    y_sorted = y_back.at[slot].get(mode="fill", fill_value=0)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted), jnp.sum(travels & ~kept)

  def body(x, experts, weights, valid, wg, wu, wd):
    b, t, d = x.shape
    k = experts.shape[-1]
    n = b * t
    e_local = wg.shape[0]
    flat = experts.reshape(n * k)
    reduce_axes = plan.hidden_axes
    if plan.tokens_split:
      real = jnp.repeat(valid.reshape(n), k)
      y_copies, dropped = _exchange(x.reshape(n, d), flat, real, k, e_local, wg, wu, wd)
    else:
      # Tokens are replicated over the expert axes (or there are none): apply this
      # shard's experts to every copy meant for them (others are void), add the shards.
      local = flat - jax.lax.axis_index(axes) * e_local if axes else flat
      ids = jnp.where((local >= 0) & (local < e_local), local, e_local).astype(jnp.int32)
      # Typed as varying over the expert (and hidden) axes up front: argsort drops
      # that type from the permutation, so the gathers below would not add the
      # cast, and its transpose is the psum the replicated tokens' cotangent needs.
      x, _ = manual_axes.align(x, wg)
      y_copies = ffn(x.reshape(n, d)[jnp.arange(n * k) // k], ids, wg, wu, wd)
      dropped = jnp.zeros((), jnp.int32)
      reduce_axes = reduce_axes + axes
    # Cast back (weighted_copies) before the psum: it moves the activations' bytes.
    y = weighted_copies(y_copies.reshape(n, k, d), weights.reshape(n, k))
    if reduce_axes:
      y = jax.lax.psum(y, reduce_axes)
    return y.reshape(b, t, d), dropped.astype(jnp.float32).reshape(1, 1)

  if valid is None:
    valid = jnp.ones(x.shape[:2], bool)
  in_specs = (plan.token_spec, row_spec, row_spec, row_spec, plan.gate_spec, plan.gate_spec,
              plan.down_spec)
  args = (x, experts, weights, valid, wg, wu, wd)
  if sharding.explicit_mesh() is not None:
    # Typed shardings must equal in_specs; this is where ZeRO-3 gathers embed.
    args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
  y, dropped = jax.shard_map(body, in_specs=in_specs,
                             out_specs=(plan.token_spec, row_spec))(*args)
  return y, jnp.sum(dropped)
