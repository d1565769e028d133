"""Output types of ``pallas_call`` inside ``shard_map`` (varying mesh axes).

With ``check_vma`` (the default), ``shard_map`` needs every ``pallas_call`` output
to say which manual mesh axes it varies over. A kernel's outputs vary over the
union of its operands' axes, so the operands are first cast to that union and
the outputs declared with it. Outside ``shard_map`` both are no-ops.
"""

from typing import Any

import jax

from blockdiff_jax.model import sharding


_varying = sharding.varying_axes
align = sharding.same_varying_axes


def out_struct(shape, dtype, like: Any) -> jax.ShapeDtypeStruct:
  """``ShapeDtypeStruct`` of a kernel output varying like the (aligned) operand ``like``."""
  varying = _varying(like)
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
