"""Device meshes, logical-axis rules and sharded init/train steps (ZeRO-3 + TP + EP).

One table of rules maps the model's logical axis names to the mesh axes
``data, fsdp, expert, tensor``:

* parameters and optimizer moments are sharded over ``fsdp`` along ``embed``
  (ZeRO-3: every device holds 1/fsdp of every matrix; XLA all-gathers a weight
  where it is used and reduce-scatters its gradient);
* attention heads, dense MLP hidden units, expert hidden units and the vocabulary
  over ``tensor`` (Megatron-style tensor parallelism);
* MoE expert weights over ``expert`` along their leading expert axis;
* the batch over ``data``, ``fsdp`` and ``expert`` (the expert axis carries
  batch outside the MoE layers, so no device computes attention redundantly).

Mesh axis types (``mesh.axis_types``). ``auto`` (the default) leaves layouts
between the jit boundaries to GSPMD/Shardy, guided by logical sharding
constraints at block boundaries. ``explicit`` is JAX 0.10's sharding-in-types
mode (what ``jax.make_mesh`` returns by default): every array's type carries its
sharding and an op whose result layout is ambiguous is an error. The same model
code runs in both: the few such ops name their layout (the embedding gather,
row-parallel projections via ``layers.DenseGeneral``, norm scales and the
router gathered at use, the MoE ``shard_map`` inputs resharded to its specs),
and two places hand the choice back to the compiler with
``jax.sharding.auto_axes``: the attention core (the GQA head grouping has no
unique typed layout when ``heads`` and ``kv_heads`` split differently) and the
decoder's loop. ``tests/test_sharding_train.py`` runs the train step, the eval
step and the decoder on Explicit meshes against one device.

MoE expert parallelism. Each MoE layer dispatches inside a ``shard_map``
(``model/expert_parallel.py``): tokens stay on their device, token copies travel
to the shard holding their expert by ``all_to_all`` over ``expert`` and come
back the same way (dropless by default; ``moe.capacity_factor`` bounds the
buffers GShard-style). ``moe.expert_parallel = "gather"`` instead lets GSPMD
partition the local sort-based dispatch; it all-gathers the expert weights and,
as the compiled HLO shows, all-reduces the token-copy buffers, about 3x the
bytes of the dropless all-to-all (``experiments/expert_parallel_comm.py``).
``tests/test_sharding_train.py`` and ``tests/test_expert_parallel.py`` check that
losses, outputs and gradients match a single device.
"""

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from blockdiff_jax.model import layers
from blockdiff_jax.model import masks
from blockdiff_jax.model import sharding as sharding_lib
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib
from blockdiff_jax.train import step as step_lib

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
fit_spec = sharding_lib.fit_spec
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axes, in priority order (flax's first-match-wins semantics:
# a mesh axis is used at most once per array).
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
  """The ``config.mesh`` section: axis sizes and the logical-axis rules table."""
  c = ml_collections.ConfigDict()
  c.data = 1  # Pure data-parallel replicas (gradients all-reduced); -1 = the rest.
  c.fsdp = -1  # ZeRO-3 shards of params/optimizer state (also splits the batch); -1 = the rest.
  c.expert = 1  # Shards of the MoE expert axis (also splits the batch); -1 = the rest.
  c.tensor = 1  # Tensor-parallel shards of heads, MLP, expert hidden and vocab; -1 = the rest.
  # auto (GSPMD propagates layouts) | explicit (sharding in types, JAX's default).
  c.axis_types = "auto"
  # Logical axis -> mesh axis (or tuple of axes, or None), first match wins.
  c.rules = DEFAULT_RULES
  c.plan_devices = 0  # --mode=plan: devices of the abstract mesh; 0 = the mesh's own size.
  c.plan_memory_gib = 80.0  # --mode=plan: memory per device to check the plan against.
  return c


def logical_rules(mesh_config: ml_collections.ConfigDict | None) -> Rules:
  """The rules table of a mesh config as hashable tuples (JSON round-trips give lists)."""
  rules = DEFAULT_RULES if mesh_config is None else mesh_config.rules
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"mesh.rules[{i}]={rule!r} must be a (logical, mesh axes) pair")
    logical, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [] if axes is None or axes in MESH_AXES else [axes]
    if bad:
      raise ValueError(f"mesh.rules[{i}] maps {logical!r} to unknown mesh axes {bad}; "
                       f"the mesh axes are {MESH_AXES}")
    out.append((str(logical), axes))
  return tuple(out)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes (one may be -1 = the rest) for ``num_devices`` devices."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  rest = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {', '.join(bad)}")
  if len(rest) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {rest}")
  known = math.prod(s for s in sizes if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh axes "
                       f"{dict(zip(MESH_AXES, sizes))} (product {known})")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


AXIS_TYPES = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}


def axis_types(mesh_config: ml_collections.ConfigDict | None) -> tuple[Any, ...]:
  """The mesh's axis types from ``mesh.axis_types`` (auto | explicit)."""
  name = "auto" if mesh_config is None else mesh_config.get("axis_types", "auto")
  if name not in AXIS_TYPES:
    raise ValueError(f"mesh.axis_types must be one of {sorted(AXIS_TYPES)}, got {name!r}")
  return (AXIS_TYPES[name],) * len(MESH_AXES)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ``data x fsdp x expert x tensor`` mesh (axis types from the config)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types(mesh_config), devices=devices)


def abstract_mesh(mesh_config: ml_collections.ConfigDict,
                  num_devices: int) -> jax.sharding.AbstractMesh:
  """The same mesh without devices, for planning (nothing is allocated)."""
  return jax.sharding.AbstractMesh(mesh_shape(mesh_config, num_devices), MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def param_specs(abstract_boxed_params: Any, rules: Rules) -> Any:
  """Mesh PartitionSpecs (before fitting to shapes) of boxed params, unboxed tree."""
  def spec(x):
    if not _is_boxed(x):
      return P()
    return nn.logical_to_mesh_axes(tuple(x.names), rules)
  return jax.tree.map(spec, abstract_boxed_params, is_leaf=_is_boxed)


def param_shardings(abstract_boxed_params: Any, mesh, rules: Rules) -> Any:
  """NamedShardings of the (unboxed) params from their logical names and the rules.

  Args:
    abstract_boxed_params: ``jax.eval_shape`` of ``model.init(...)["params"]``
      (leaves boxed in ``nn.LogicallyPartitioned``; unboxed leaves are replicated).
    mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh``.
    rules: logical-axis rules (``logical_rules(config.mesh)``).
  """
  specs = param_specs(abstract_boxed_params, rules)
  shapes = nn.unbox(abstract_boxed_params)
  def one(spec, x):
    fitted = fit_spec(spec, x.shape, mesh)
    if fitted != P(*spec) and any(s is not None for s in spec):
      logging.info("sharding %s of shape %s as %s (rules asked for %s)", x.dtype, x.shape,
                   fitted, spec)
    return NamedSharding(mesh, fitted)
  return jax.tree.map(one, specs, shapes, is_leaf=lambda s: isinstance(s, P))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_sharding: Any, mesh) -> Any:
  """Optimizer moments follow their parameters; everything else (counts) is replicated."""
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, param_sharding,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def state_shardings(abstract_state: state_lib.TrainState, param_sharding: Any,
                    tx: optax.GradientTransformation, mesh) -> state_lib.TrainState:
  """Shardings of a whole TrainState (step replicated, EMA like the params)."""
  return state_lib.TrainState(
      step=replicated(mesh), params=param_sharding,
      opt_state=opt_state_shardings(tx, abstract_state.opt_state, param_sharding, mesh),
      ema_params=None if abstract_state.ema_params is None else param_sharding)


def batch_spec(rules: Rules = DEFAULT_RULES) -> P:
  """PartitionSpec of [batch, ...] inputs: the rule of ``activation_batch``."""
  return nn.logical_to_mesh_axes(("activation_batch",), rules)


def batch_sharding(mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of the leading (batch) axis of every input array."""
  return NamedSharding(mesh, batch_spec(rules))


def put_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Global arrays from a host batch that every process holds in full.

  Each process copies only the shards its own devices hold, so this works for
  one process and for many (the data pipeline is deterministic per step).
  """
  def one(x):
    x = np.asarray(x)
    s = NamedSharding(sharding.mesh, fit_spec(sharding.spec, x.shape, sharding.mesh))
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, batch)


def activation_rules_supported() -> bool:
  """Whether the model's parameter boxes tolerate active logical rules in ``apply``.

  flax's ``nn.DenseGeneral`` builds a multi-axis kernel's init flat and unboxes it
  in between; ``Scope.param`` re-runs that init under ``eval_shape`` on every
  apply, and with a mesh and rules active the N-D logical constraint lands on the
  2-D flat kernel (a rank error). ``layers.logical_init`` boxes that skip the
  constraint on unbox (the patch in the scale-out report) avoid it; parameters get
  their layout from jit's in/out shardings anyway.
  """
  box = layers.logical_init(nn.initializers.zeros, ("embed",))(jax.random.key(0), (1,))
  return type(box).unbox is not nn.LogicallyPartitioned.unbox


@contextlib.contextmanager
def mesh_context(mesh, rules: Rules):
  """The mesh, and the logical rules when the model supports them (activation constraints).

  Without the rules the activation constraints are no-ops and GSPMD propagates
  the layout from the parameter and batch shardings alone (same numbers).
  """
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    if activation_rules_supported():
      stack.enter_context(nn.logical_axis_rules(rules))
    yield


def _dummy_inputs(length: int = 8):
  tokens = jnp.zeros((1, length), jnp.int32)
  meta = masks.make_meta(jnp.arange(length)[None], 1, masks.CLEAN)
  return tokens, meta


def abstract_params(model: nn.Module, length: int = 8) -> Any:
  """Boxed ShapeDtypeStructs of the params (``jax.eval_shape``: nothing is allocated)."""
  tokens, meta = _dummy_inputs(length)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, meta)["params"])


def shard_init(model: nn.Module, mesh, rules: Rules, seed: int,
               length: int = 8) -> tuple[Any, Any]:
  """Initializes the params directly in their shards.

  Shapes come from ``jax.eval_shape``, shardings from the rules, and the init runs
  under ``jax.jit(out_shardings=...)`` so no device ever holds a full-size copy.
  Values equal ``trainer.init_params`` (the PRNG is partitionable).

  Returns:
    (unboxed params, their NamedShardings).
  """
  shardings = param_shardings(abstract_params(model, length), mesh, rules)
  tokens, meta = _dummy_inputs(length)

  def init():
    boxed = model.init(jax.random.key(seed), tokens, meta)["params"]
    return jax.tree.map(lambda b: b.value if _is_boxed(b) else b, boxed, is_leaf=_is_boxed)

  # Traced outside mesh_context on purpose: flax applies the logical rules to
  # intermediate (reshaped) kernels inside init when rules are active, which is
  # both wrong (rank mismatch) and unneeded: out_shardings alone sets the layout.
  params = jax.jit(init, out_shardings=shardings)()
  return params, shardings


@dataclasses.dataclass
class ShardedTrain:
  """Jitted, sharded training functions for one mesh (built by ``make_sharded_train``).

  Attributes:
    mesh: the device mesh.
    rules: logical-axis rules.
    param_sharding: NamedShardings of the params.
    state_sharding: NamedShardings of the TrainState.
    batch_sharding: sharding of every input array's batch axis.
    abstract_state: ShapeDtypeStructs with shardings (checkpoint restore target).
    init_state: ``init_state(seed) -> TrainState``, created in its shards.
    train_step: ``train_step(state, batch, base_rng) -> (state, metrics)``; the
      state is donated; metrics come back replicated.
    eval_step: ``eval_step(params, batch, rng) -> metrics``.
  """

  mesh: jax.sharding.Mesh
  rules: Rules
  param_sharding: Any
  state_sharding: state_lib.TrainState
  batch_sharding: NamedSharding
  abstract_state: state_lib.TrainState
  init_state: Callable[[int], state_lib.TrainState]
  train_step: Callable
  eval_step: Callable

  def put_batch(self, batch: Any) -> Any:
    """Host batch (numpy, the same on every process) -> sharded global arrays."""
    return put_batch(batch, self.batch_sharding)

  def context(self):
    """``with sharded.context():`` jit/apply the model with activation constraints."""
    return mesh_context(self.mesh, self.rules)


def _in_context(fn: Callable, mesh, rules: Rules) -> Callable:
  """Calls (and so traces) ``fn`` inside the mesh/rules context."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with mesh_context(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped


def make_sharded_train(config: ml_collections.ConfigDict, mesh, model: nn.Module,
                       obj: Any, tx: optax.GradientTransformation | None = None,
                       lr_schedule: optax.Schedule | None = None) -> ShardedTrain:
  """Sharded init, train step and eval step for ``config`` on ``mesh``.

  Args:
    config: the experiment config (``config.mesh`` supplies the rules; when it is
      absent the default rules are used).
    mesh: from ``make_mesh``.
    model: the Transformer.
    obj: the BD3-LM objective (``config_lib.objective``).
    tx: the optimizer; default ``optimizer.make_optimizer(config.train)``.
    lr_schedule: for the metrics; default ``optimizer.learning_rate_schedule``.
  """
  t = config.train
  rules = logical_rules(config.get("mesh"))
  tx = optimizer.make_optimizer(t) if tx is None else tx
  lr_schedule = optimizer.learning_rate_schedule(t) if lr_schedule is None else lr_schedule
  use_ema = t.ema_decay > 0
  p_sharding = param_shardings(abstract_params(model), mesh, rules)
  abstract = jax.eval_shape(
      lambda: state_lib.create(nn.unbox(abstract_params(model)), tx, use_ema))
  s_sharding = state_shardings(abstract, p_sharding, tx, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, s_sharding)
  b_sharding = batch_sharding(mesh, rules)
  rep = replicated(mesh)
  d = config.data
  n_batch = math.prod(mesh.shape[a] for a in sharding_lib.axes_of(b_sharding.spec[0]))
  micro = d.batch_size // t.grad_accum_steps
  if micro % n_batch:
    raise ValueError(f"data.batch_size={d.batch_size} / train.grad_accum_steps="
                     f"{t.grad_accum_steps} = {micro} sequences per micro-batch is not "
                     f"divisible by the {n_batch} batch shards of mesh {dict(mesh.shape)}")

  def init_state(seed: int) -> state_lib.TrainState:
    params, _ = shard_init(model, mesh, rules, seed)
    create = jax.jit(lambda p: state_lib.create(p, tx, use_ema), out_shardings=s_sharding)
    return create(params)

  def apply_fn(params, tokens, meta, **kwargs):
    return model.apply({"params": params}, tokens, meta, **kwargs)

  train_step = step_lib.make_train_step(apply_fn, obj, tx, lr_schedule, t.grad_accum_steps,
                                        t.ema_decay)
  jitted_train = jax.jit(train_step, donate_argnums=0,
                         in_shardings=(s_sharding, b_sharding, rep),
                         out_shardings=(s_sharding, rep))
  jitted_eval = jax.jit(step_lib.make_eval_step(apply_fn, obj),
                        in_shardings=(p_sharding, b_sharding, rep), out_shardings=rep)
  return ShardedTrain(
      mesh=mesh, rules=rules, param_sharding=p_sharding, state_sharding=s_sharding,
      batch_sharding=b_sharding, abstract_state=abstract, init_state=init_state,
      train_step=_in_context(jitted_train, mesh, rules),
      eval_step=_in_context(jitted_eval, mesh, rules))


def shard_bytes(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
  """Bytes of one device's shard (ceil division, as padded uneven shards)."""
  sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
  n = 1
  for i, dim in enumerate(shape):
    entry = sharding.spec[i] if i < len(sharding.spec) else None
    n *= -(-dim // math.prod(sizes[a] for a in sharding_lib.axes_of(entry)))
  return n * np.dtype(dtype).itemsize


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_params_fit(saved: Any, abstract: Any, where: str = "checkpoint") -> None:
  """Raises ValueError naming the first parameter whose saved shape differs.

  Args:
    saved: tree of checkpoint metadata (anything with ``.shape``).
    abstract: tree of ``jax.ShapeDtypeStruct`` the config expects.
    where: names the checkpoint in the message.
  """
  saved_flat = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  want_flat = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  for path, want in want_flat.items():
    if path not in saved_flat:
      raise ValueError(f"parameter {path} (shape {tuple(want.shape)}) is missing from {where}")
    got = tuple(saved_flat[path].shape)
    if got != tuple(want.shape):
      raise ValueError(f"parameter {path} has shape {got} in {where} but the config expects "
                       f"{tuple(want.shape)}")
  extra = sorted(set(saved_flat) - set(want_flat))
  if extra:
    raise ValueError(f"{where} has parameters the config lacks: {extra[:5]}")


def restore_params(checkpoint_dir: str, abstract_params: Any, step: int | None = None,
                   item: str = "state", subtree: str = "params",
                   fallback_subtree: str | None = None) -> Any:
  """Restores only ``<item>/<subtree>`` (the params) of a checkpoint, onto any mesh.

  Orbax partial restore reads just the requested arrays, and each device reads
  just its own shards: the optimizer state is never loaded. Shapes are checked
  against the checkpoint metadata first.

  Args:
    checkpoint_dir: the ``checkpoints`` directory of a run (``Checkpointer``'s).
    abstract_params: ``jax.ShapeDtypeStruct`` tree with shardings to restore onto.
    step: which step; None = the latest.
    item: the Composite item holding the train state.
    subtree: the field of the train state to restore (``ema_params`` for EMA).
    fallback_subtree: restored instead when the checkpoint lacks ``subtree`` (e.g.
      ``params`` when EMA was off).

  Returns:
    The params, laid out as ``abstract_params``' shardings say.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  if step is None:
    steps = [int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()] if os.path.isdir(
        checkpoint_dir) else []
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    step = max(steps)
  path = os.path.join(checkpoint_dir, str(step), item)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} not found: no step {step} in {checkpoint_dir}")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    if (subtree not in tree or tree[subtree] is None) and fallback_subtree is not None:
      subtree = fallback_subtree
    if subtree not in tree or tree[subtree] is None:
      raise ValueError(f"{path} has no {subtree!r} (it holds {sorted(tree)})")
    check_params_fit(tree[subtree], abstract_params, f"checkpoint {path}")
    target = {subtree: abstract_params}
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return restored[subtree]
