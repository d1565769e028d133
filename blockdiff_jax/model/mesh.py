"""Device meshes and the logical-axis rules that lay the model out on them (ZeRO-3 + TP + EP).

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
import math
import numbers
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from blockdiff_jax.model import sharding as sharding_lib

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
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

# Every logical axis name the model gives its weights and activations.
LOGICAL_AXES = tuple(logical for logical, _ in DEFAULT_RULES)


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
    # A misspelt logical name ("experts") matches no array: the rule did nothing and
    # the weights kept the default layout without a word.
    if logical not in LOGICAL_AXES:
      raise ValueError(f"mesh.rules[{i}] maps unknown logical axis {logical!r}; the model's "
                       f"logical axes are {LOGICAL_AXES}")
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [] if axes is None or axes in MESH_AXES else [axes]
    if bad:
      raise ValueError(f"mesh.rules[{i}] maps {logical!r} to unknown mesh axes {bad}; "
                       f"the mesh axes are {MESH_AXES}")
    # A PartitionSpec may use a mesh axis once: caught here, naming the rule, rather
    # than by JAX's DuplicateSpecError when the first sharding is built from it.
    if isinstance(axes, tuple) and len(set(axes)) != len(axes):
      raise ValueError(f"mesh.rules[{i}] maps {logical!r} to {axes}, which names a mesh "
                       f"axis more than once")
    out.append((logical, axes))
  return tuple(out)


def _axis_sizes(mesh_config: ml_collections.ConfigDict) -> list[int]:
  """The four axis sizes of a mesh section, checked field by field.

  A misspelt field (``mesh.experts = 4``) would otherwise be ignored, running with
  ``expert = 1``; a missing axis failed with a bare KeyError; and ``int()`` turned a
  size of 2.5 into 2 and ``True`` into 1 without a word.
  """
  known = set(default_mesh_config().keys())
  unknown = sorted(set(mesh_config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown mesh fields {['mesh.' + k for k in unknown]}; the mesh "
                     f"fields are {sorted(known)}")
  missing = [a for a in MESH_AXES if a not in mesh_config]
  if missing:
    raise ValueError(f"the mesh section lacks {['mesh.' + a for a in missing]}: give every "
                     f"axis of {MESH_AXES} a size (model.mesh.default_mesh_config() has them)")
  sizes = []
  for a in MESH_AXES:
    s = mesh_config[a]
    if isinstance(s, bool) or not isinstance(s, numbers.Integral):
      raise ValueError(f"mesh.{a} must be an integer (>= 1, or -1 = the rest), got {s!r}")
    sizes.append(int(s))
  return sizes


def validate(mesh_config: ml_collections.ConfigDict) -> list[int]:
  """The axis sizes of a mesh section (-1 kept), checked without knowing the devices."""
  sizes = _axis_sizes(mesh_config)
  bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {', '.join(bad)}")
  rest = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(rest) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {rest}")
  return sizes


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes (one may be -1 = the rest) for ``num_devices`` devices."""
  if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral) or (
      num_devices < 1):
    # 0 devices gave the -1 axis size 0, a negative count a negative size.
    raise ValueError(f"a mesh needs at least one device, got {num_devices!r}")
  sizes = validate(mesh_config)
  rest = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
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


def single_device_mesh_config() -> ml_collections.ConfigDict:
  """The mesh of a config without one: every axis of size 1 (as big_vision and lm1b do)."""
  c = default_mesh_config()
  c.fsdp = 1
  return c


def mesh_of(config: ml_collections.ConfigDict,
            devices: Sequence[jax.Device] | None = None) -> tuple[jax.sharding.Mesh, Rules]:
  """The mesh and rules a config runs on.

  A config without ``mesh`` runs on a one-device mesh with no rules: on one device
  the rules could only change the op sequence (e.g. an MoE ``shard_map`` of one
  shard), never the layout.
  """
  if config.get("mesh") is None:
    devices = jax.local_devices()[:1] if devices is None else list(devices)[:1]
    return make_mesh(single_device_mesh_config(), devices), ()
  return make_mesh(config.mesh, devices), logical_rules(config.mesh)


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


def lost_rules(names: Sequence[str | None], rules: Rules) -> list[str]:
  """Why rules asked to shard an axis of an array with logical ``names`` go unused.

  Flax gives each rule's mesh axes to its logical axis only while no earlier rule
  has used them in the same array (a mesh axis splits one dimension). A rule such
  as ``("expert", ("expert", "fsdp"))`` listed after ``("embed", "fsdp")`` then
  leaves the experts of every expert weight unsplit, not even over ``expert``:
  expert parallelism and the memory it saves vanish without an error. An axis
  counts as lost when every rule for it names mesh axes and it gets none (a
  fallback rule, ``(name, None)`` included, states that the result is intended).
  """
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  out = []
  for pos, name in enumerate(names):
    if not isinstance(name, str) or spec[pos] is not None:
      continue
    matching = [(i, axes) for i, (logical, axes) in enumerate(rules) if logical == name]
    if not matching or any(axes is None for _, axes in matching):
      continue
    i, axes = matching[0]
    wanted = set(sharding_lib.axes_of(axes))
    takers = [f"{names[j]!r} -> {spec[j]}" for j in range(len(names))
              if j != pos and wanted & set(sharding_lib.axes_of(spec[j]))]
    out.append(f"mesh.rules[{i}] ({name!r} -> {axes}) does not shard the {name!r} axis "
               f"of arrays with logical axes {tuple(names)}: earlier rules gave its mesh axes "
               f"to {', '.join(takers)} (a mesh axis splits one dimension), so it is "
               f"replicated. List the rule before those, or add a fallback rule "
               f"for {name!r}")
  return out


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
  # Told once per rule and array kind: otherwise a rule that loses to an earlier one
  # (flax's first-match-wins) leaves weights unsharded without a word.
  lost = {}
  for x in jax.tree.leaves(abstract_boxed_params, is_leaf=_is_boxed):
    if _is_boxed(x):
      for message in lost_rules(tuple(x.names), rules):
        lost.setdefault(message)
  for message in lost:
    logging.warning("%s", message)
  def one(spec, x):
    fitted = sharding_lib.fit_spec(spec, x.shape, mesh)
    if fitted != P(*spec) and any(s is not None for s in spec):
      logging.info("sharding %s of shape %s as %s (rules asked for %s)", x.dtype, x.shape,
                   fitted, spec)
    return NamedSharding(mesh, fitted)
  return jax.tree.map(one, specs, shapes, is_leaf=lambda s: isinstance(s, P))


def expert_split_warning(num_experts: int, mesh) -> str | None:
  """Why ``mesh``'s expert axis will not split the experts, or None when it will.

  A count the axis does not divide is replicated (``fit_spec``), which is valid but
  turns expert parallelism off: every device then holds and runs every expert.
  """
  size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("expert", 1)
  if num_experts and size > 1 and num_experts % size:
    return (f"warning: model.moe.num_experts={num_experts} is not divisible by the mesh's "
            f"expert axis ({size}): every device holds all experts (no expert parallelism)")
  return None


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


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
    s = NamedSharding(sharding.mesh, sharding_lib.fit_spec(sharding.spec, x.shape, sharding.mesh))
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, batch)


@contextlib.contextmanager
def mesh_context(mesh, rules: Rules):
  """The mesh and the logical rules (the model's activation and dispatch layouts)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


