"""Output types of ``pallas_call`` inside ``shard_map`` (varying mesh axes).

With ``check_vma`` (the default), ``shard_map`` needs every ``pallas_call`` output
to say which manual mesh axes it varies over. A kernel's outputs vary over the
union of its operands' axes, so the operands are first cast to that union and
the outputs declared with it. Outside ``shard_map`` both are no-ops.
"""

from typing import Any

import jax


def _varying(x) -> frozenset:
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) or ())


def align(*operands: Any) -> tuple[Any, ...]:
  """Operands cast to vary over the union of their manual mesh axes."""
  union = frozenset().union(*(_varying(x) for x in operands))
  return tuple(jax.lax.pcast(x, tuple(sorted(union - _varying(x))), to="varying")
               if union - _varying(x) else x for x in operands)


def out_struct(shape, dtype, like: Any) -> jax.ShapeDtypeStruct:
  """``ShapeDtypeStruct`` of a kernel output varying like the (aligned) operand ``like``."""
  varying = _varying(like)
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
