"""Mesh PartitionSpecs from logical axis names, fitted to array shapes.

The model names every weight and activation axis logically (``embed``,
``expert``, ``activation_batch``...); the rules table that maps them to mesh
axes is set by ``model.mesh.mesh_context`` (flax's logical-axis-rules
context). These helpers turn names into specs the model can hand to
``shard_map``, and the partitioner uses the same ``fit_spec`` for jit shardings,
so both always agree on a layout.
"""

from typing import Sequence

import flax.linen as nn
import jax

P = jax.sharding.PartitionSpec

# Logical axes of the residual stream [batch, length, embed].
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple) as a tuple."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drops mesh axes that do not divide their dimension (e.g. 2 kv heads on tensor=4).

  Keeps the longest prefix of each dimension's axes whose size product divides the
  dimension, so every shard has the same shape (what Orbax and donation expect).

  Raises:
    ValueError: ``spec`` names a mesh axis that ``mesh`` does not have (a rules
      table written for ``data, fsdp, expert, tensor`` used on a hand-made mesh).
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  # Checked up front: the lookup below would otherwise fail with a bare KeyError
  # naming only the axis, far from the rules or mesh that caused it.
  missing = sorted({a for entry in spec for a in axes_of(entry)} - set(sizes))
  if missing:
    raise ValueError(f"{spec} names mesh axes {missing} that the mesh does not have (its axes "
                     f"are {tuple(mesh.axis_names)}); build the mesh with model.mesh.make_mesh "
                     f"or map those logical axes to axes of this mesh in the rules")
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    kept, prod = [], 1
    for a in axes_of(entry):
      if dim % (prod * sizes[a]):
        break
      kept.append(a)
      prod *= sizes[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh) -> P:
  """The fitted mesh spec of an array with logical axis ``names`` under the active rules."""
  spec = nn.logical_to_mesh_axes(tuple(names), nn.get_logical_axis_rules())
  return fit_spec(spec, shape, mesh)


def explicit_mesh():
  """The active mesh when any of its axes is Explicit (sharding in types), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
    return None
  return mesh


def out_spec(names: Sequence[str | None], shape: Sequence[int]) -> P | None:
  """``out_sharding`` for an op producing logical axes ``names``: None unless explicit."""
  mesh = explicit_mesh()
  return None if mesh is None else logical_spec(names, shape, mesh)


def replicate_for_use(w):
  """Under Explicit axes, an all-gathered copy of a small weight (norm scale, bias).

  Sharding-in-types refuses ``x * scale`` when ``scale`` is split over an axis
  that ``x`` uses for another dimension; the gather is what GSPMD would insert.
  Without an Explicit mesh it returns ``w`` unchanged.
  """
  if explicit_mesh() is None:
    return w
  return jax.sharding.reshard(w, P())
