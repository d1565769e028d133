"""The train and eval steps, and their jit on a mesh: the one training path.

Every run has a mesh (``model.mesh.mesh_of``: one device when the config has no
``mesh`` section), so the same code creates the state in its shards, steps and
evaluates on one CPU and on a GPU cluster.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import losses
from blockdiff_jax.model import build
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import sharding as sharding_lib
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib

Array = Any


def step_rng(base_rng: Array, step: Array) -> Array:
  """The noise key of a step: a pure function of the step, so resumed runs match."""
  return jax.random.fold_in(base_rng, step)


# BD3-LM's metrics that are means over its masked tokens, not over its scored ones.
_PER_MASKED_TOKEN = ("masked_ce", "masked_accuracy")


def metric_counts(obj: Any, metrics: dict) -> dict:
  """Per metric of one micro-batch, the count it is a mean over (its accumulation weight).

  ``losses.LOSS_TOKENS`` for most; BD3-LM's ``masked_ce`` and ``masked_accuracy`` are
  means over the masked tokens, a different share of each micro-batch's scored ones:
  weighed by the scored count, the accumulated ``masked_accuracy`` missed the full
  batch's by a tenth. Its ``masked_fraction`` is of the clamped scored count, so it
  gives the masked count, as in ``evaluation/routing_sweep.py``.
  """
  tokens = metrics[losses.LOSS_TOKENS].astype(jnp.float32)
  counts = dict.fromkeys(metrics, tokens)
  if isinstance(obj, losses.BlockDiffusionObjective) and "masked_fraction" in metrics:
    masked = metrics["masked_fraction"].astype(jnp.float32) * jnp.maximum(tokens, 1.0)
    counts.update({k: masked for k in _PER_MASKED_TOKEN if k in metrics})
  return counts


def make_train_step(apply_fn: Callable, obj: losses.BlockDiffusionObjective,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    trainable_mask: Callable[[Any], Any] | None = None):
  """Builds ``train_step(state, batch, base_rng) -> (state, metrics)`` (not yet jitted).

  Gradients are averaged over ``grad_accum_steps`` micro-batches with a scan, each
  weighed by the count its loss is a mean over (``losses.LOSS_TOKENS``): micro-batches
  of SFT rows score different numbers of tokens, and a plain mean of their means would
  weigh a token of a sparse micro-batch more. Each metric is weighed by the count it is
  a mean over (``metric_counts``). MoE routing statistics are per forward, so a step
  with MoE layers matches the full batch exactly only when dropless
  (``moe.capacity_factor = 0``) with ``moe.load_balance_weight = 0`` and, when
  micro-batches score different token counts, ``moe.z_loss_weight = 0``: the
  load-balance loss is a product of two batch means (not a mean over tokens), an
  expert-parallel capacity is a share of one forward's tokens, and the z-loss is a mean
  over a micro-batch's tokens, not its scored ones. A step
  whose loss or gradient norm is not finite leaves the state unchanged and reports
  ``finite = 0`` so the host can stop the run. With ``trainable_mask`` (params -> bool
  tree, e.g. LoRA adapters only) frozen weights enter the loss through
  ``stop_gradient``, so their weight gradients (a third of the backward's FLOPs) are
  never computed; their gradient is zero, and accumulation keeps no sum for them.
  """

  objective_loss, objective_corrupt = diffusion_config.loss_functions(obj)

  def loss_fn(params, batch, rng, corrupted=None):
    if trainable_mask is not None:
      params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p),
                            params, trainable_mask(params))
    return objective_loss(apply_fn, params, batch, rng, obj, corrupted)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: state_lib.TrainState, batch: dict, base_rng: Array):
    rng = step_rng(base_rng, state.step)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      # Noise is drawn for the full batch, so accumulation changes no random draw.
      corrupted = objective_corrupt(rng, batch, obj)
      micro = split_micro_batches((batch, corrupted), grad_accum_steps)

      # The accumulator holds the trainable weights only: a frozen weight's gradient
      # is zero, and a zeros_like(params) carry cost a LoRA run a full copy of the base.
      leaves, treedef = jax.tree.flatten(state.params)
      trains = ([True] * len(leaves) if trainable_mask is None
                else jax.tree.leaves(trainable_mask(state.params)))
      pick = lambda tree: [x for x, t in zip(jax.tree.leaves(tree), trains) if t]

      def body(carry, mb):
        (_, m), g = grad_fn(state.params, mb[0], rng, mb[1])
        w = _loss_tokens(m)
        grad_sum = jax.tree.map(lambda c, x: (c + w * x).astype(c.dtype), carry[0], pick(g))
        return (grad_sum, _add_metrics(carry[1], m, obj)), None

      first = jax.tree.map(lambda x: x[0], micro)
      metric_shapes = jax.eval_shape(loss_fn, state.params, first[0], rng, first[1])[1]
      zeros = ([jnp.zeros_like(p) for p in pick(state.params)], _no_metrics(metric_shapes))
      (accumulated, sums), _ = jax.lax.scan(body, zeros, micro)
      metrics = _mean_metrics(sums)
      # An objective reporting its true count may report 0 for a batch scoring nothing.
      total = jnp.maximum(metrics[losses.LOSS_TOKENS], 1.0)
      accumulated = iter([x / total for x in accumulated])
      grads = treedef.unflatten([next(accumulated) if t else jnp.zeros_like(p)
                                 for p, t in zip(leaves, trains)])

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      # e + (1-d)(p - e), not d*e + (1-d)*p: exact where p == e, so the EMA of a weight
      # LoRA freezes stays bit-identical to it (the other form moved it by an ulp).
      ema = jax.tree.map(lambda e, p: e + (1 - ema_decay) * (p - e), ema, params)
    new = state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               ema_params=ema)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    # A non-finite step is dropped whole: the state keeps its last good values.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new, metrics

  return train_step


def make_eval_step(apply_fn: Callable, obj: losses.BlockDiffusionObjective,
                   micro_batches: int = 1):
  """Builds ``eval_step(params, batch, rng) -> metrics`` (NELBO with fresh noise).

  With ``micro_batches`` > 1 the batch runs as that many forwards, split and weighed as
  the train step's gradient accumulation (the same noise, the same metrics): a
  validation batch of a run that accumulates needs no more memory than its micro-batch
  (in one forward, a 7B run's fp32 logits alone took 8 times a train forward's).
  """

  objective_loss, objective_corrupt = diffusion_config.loss_functions(obj)

  def eval_step(params, batch, rng):
    if micro_batches == 1:
      return objective_loss(apply_fn, params, batch, rng, obj)[1]
    corrupted = objective_corrupt(rng, batch, obj)
    micro = split_micro_batches((batch, corrupted), micro_batches)
    metrics_of = lambda mb: objective_loss(apply_fn, params, mb[0], rng, obj, mb[1])[1]
    shapes = jax.eval_shape(metrics_of, jax.tree.map(lambda x: x[0], micro))
    sums, _ = jax.lax.scan(lambda c, mb: (_add_metrics(c, metrics_of(mb), obj), None),
                           _no_metrics(shapes), micro)
    return _mean_metrics(sums)

  return eval_step


def split_micro_batches(tree: Any, n: int) -> Any:
  """[n, B / n, ...] leaves of a tree of [B, ...] arrays, for a scan over micro-batches.

  Micro-batch j takes rows j, j + n, j + 2n...: each device's rows of a batch-split
  array then split evenly, no data moves.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1),
                      tree)


def _loss_tokens(metrics: dict) -> Array:
  if losses.LOSS_TOKENS not in metrics:
    raise KeyError(f"grad_accum_steps > 1 needs the objective's metrics to report "
                   f"{losses.LOSS_TOKENS!r} (the count its loss is a mean over)")
  return metrics[losses.LOSS_TOKENS].astype(jnp.float32)


def _no_metrics(shapes: dict) -> tuple[dict, dict, Array]:
  """(weighed metric sums, their counts, scored tokens) before any micro-batch."""
  return ({k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()},
          {k: jnp.zeros((), jnp.float32) for k in shapes}, jnp.zeros((), jnp.float32))


def _add_metrics(sums: tuple[dict, dict, Array], m: dict, obj: Any) -> tuple:
  """``sums`` with micro-batch metrics ``m`` added, each weighed by ``metric_counts``."""
  total = sums[2] + _loss_tokens(m)
  mw = metric_counts(obj, m)
  return ({k: (sums[0][k] + mw[k] * m[k]).astype(sums[0][k].dtype) for k in m},
          {k: sums[1][k] + mw[k] for k in m}, total)


def _mean_metrics(sums: tuple[dict, dict, Array]) -> dict:
  metrics = {k: v / jnp.maximum(sums[1][k], 1.0) for k, v in sums[0].items()}
  metrics[losses.LOSS_TOKENS] = sums[2]  # The batch's count, not a weighed mean of it.
  return metrics


def jit_train_step(train_step: Callable, state_sharding: Any, batch_sharding: Any):
  """jit with the state donated (its buffers are reused for the new state)."""
  rep = mesh_lib.replicated(batch_sharding.mesh)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding, rep),
                 out_shardings=(state_sharding, rep))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_sharding: Any, mesh) -> Any:
  """Optimizer moments follow their parameters; everything else (counts) is replicated.

  Frozen parameters (``optax.masked``, e.g. LoRA-only training) have no moments: their
  ``MaskedNode`` places stay empty.
  """
  return optax.tree_map_params(
      tx, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, abstract_opt_state,
      param_sharding, transform_non_params=lambda _: mesh_lib.replicated(mesh),
      is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, optax.MaskedNode)))


def state_shardings(abstract_state: state_lib.TrainState, param_sharding: Any,
                    tx: optax.GradientTransformation, mesh) -> state_lib.TrainState:
  """Shardings of a whole TrainState (step replicated, EMA like the params)."""
  return state_lib.TrainState(
      step=mesh_lib.replicated(mesh), params=param_sharding,
      opt_state=opt_state_shardings(tx, abstract_state.opt_state, param_sharding, mesh),
      ema_params=None if abstract_state.ema_params is None else param_sharding)


@dataclasses.dataclass
class ShardedTrain:
  """Jitted training functions for one mesh (built by ``make_sharded_train``).

  Attributes:
    mesh: the device mesh.
    rules: logical-axis rules.
    param_sharding: NamedShardings of the params.
    state_sharding: NamedShardings of the TrainState.
    batch_sharding: sharding of every input array's batch axis.
    abstract_state: ShapeDtypeStructs with shardings (checkpoint restore target).
    init_state: ``init_state(seed, params=None) -> TrainState``, created in its shards
      (from ``params``, e.g. pretrained weights, when given).
    train_step: ``train_step(state, batch, base_rng) -> (state, metrics)``; the
      state is donated; metrics come back replicated.
    eval_step: ``eval_step(params, batch, rng) -> metrics``.
  """

  mesh: jax.sharding.Mesh
  rules: mesh_lib.Rules
  param_sharding: Any
  state_sharding: state_lib.TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: state_lib.TrainState
  init_state: Callable[[int], state_lib.TrainState]
  train_step: Callable
  eval_step: Callable

  def put_batch(self, batch: Any) -> Any:
    """Host batch (numpy, the same on every process) -> sharded global arrays."""
    return mesh_lib.put_batch(batch, self.batch_sharding)

  def context(self):
    """``with sharded.context():`` jit/apply the model with activation constraints."""
    return mesh_lib.mesh_context(self.mesh, self.rules)


def _in_context(fn: Callable, mesh, rules: mesh_lib.Rules) -> Callable:
  """Calls (and so traces) ``fn`` inside the mesh/rules context."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with mesh_lib.mesh_context(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped


def make_sharded_train(config: ml_collections.ConfigDict, mesh, model: nn.Module,
                       obj: Any, tx: optax.GradientTransformation | None = None,
                       lr_schedule: optax.Schedule | None = None,
                       rules: mesh_lib.Rules | None = None) -> ShardedTrain:
  """Init, train step and eval step for ``config`` on ``mesh``.

  Args:
    config: the experiment config.
    mesh: from ``mesh.mesh_of`` or ``mesh.make_mesh``.
    model: the Transformer.
    obj: the training objective (``diffusion.config.objective``).
    tx: the optimizer; default ``optimizer.make_optimizer(config.train)``.
    lr_schedule: for the metrics; default ``optimizer.learning_rate_schedule``.
    rules: logical-axis rules; default those of ``config.mesh`` (the default rules
      when the config has no mesh section).
  """
  t = config.train
  rules = mesh_lib.logical_rules(config.get("mesh")) if rules is None else rules
  tx = optimizer.make_optimizer(t) if tx is None else tx
  lr_schedule = optimizer.learning_rate_schedule(t) if lr_schedule is None else lr_schedule
  use_ema = t.ema_decay > 0
  boxed = build.abstract_params(model)
  p_sharding = mesh_lib.param_shardings(boxed, mesh, rules)
  abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, use_ema), nn.unbox(boxed))
  s_sharding = state_shardings(abstract, p_sharding, tx, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, s_sharding)
  b_sharding = mesh_lib.batch_sharding(mesh, rules)
  d = config.data
  n_batch = math.prod(mesh.shape[a] for a in sharding_lib.axes_of(
      b_sharding.spec[0] if len(b_sharding.spec) else None))
  micro = d.batch_size // t.grad_accum_steps
  if micro % n_batch:
    raise ValueError(f"data.batch_size={d.batch_size} / train.grad_accum_steps="
                     f"{t.grad_accum_steps} = {micro} sequences per micro-batch is not "
                     f"divisible by the {n_batch} batch shards of mesh {dict(mesh.shape)}")

  def init_state(seed: int, params: Any = None) -> state_lib.TrainState:
    """A fresh state from ``params`` (laid out on ``mesh``), or from a random init."""
    if params is None:
      params = build.init_params(model, seed, mesh, rules)
    create = jax.jit(lambda p: state_lib.create(p, tx, use_ema), out_shardings=s_sharding)
    return create(params)

  apply_fn = build.make_apply(model)
  jitted_train = jit_train_step(
      make_train_step(apply_fn, obj, tx, lr_schedule, t.grad_accum_steps, t.ema_decay,
                      optimizer.mask_fn(t.get("trainable", "all"))),
      s_sharding, b_sharding)
  rep = mesh_lib.replicated(mesh)
  jitted_eval = jax.jit(make_eval_step(apply_fn, obj, t.grad_accum_steps),
                        in_shardings=(p_sharding, b_sharding, rep), out_shardings=rep)
  return ShardedTrain(
      mesh=mesh, rules=rules, param_sharding=p_sharding, state_sharding=s_sharding,
      batch_sharding=b_sharding, abstract_state=abstract, init_state=init_state,
      train_step=_in_context(jitted_train, mesh, rules),
      eval_step=_in_context(jitted_eval, mesh, rules))
