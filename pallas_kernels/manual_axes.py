"""Output types of ``pallas_call`` inside ``shard_map`` (varying mesh axes).

With ``check_vma`` (the default), ``shard_map`` needs every ``pallas_call`` output
to say which manual mesh axes it varies over. A kernel's outputs vary over the
union of its operands' axes, so the operands are first cast to that union and
the outputs declared with it. Outside ``shard_map`` both are no-ops.
"""

from typing import Any

import jax



def _varying(x) -> frozenset[str]:
  """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside one)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) or ())


def align(*arrays):
  """Casts arrays inside ``shard_map`` to vary over the union of their mesh axes.

  JAX 0.10.2's ``argsort`` drops the varying-axes type of its input, so rows of a
  replicated operand gathered by such a permutation got a cotangent without the
  ``psum`` over those axes (wrong gradients, found by
  ``tests/test_expert_parallel.py``). Casting the operand up front makes the
  transpose of the cast supply that ``psum``. Outside ``shard_map`` a no-op.
  """
  vmas = [_varying(a) for a in arrays]
  union = frozenset().union(*vmas)
  return [jax.lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
          for a, v in zip(arrays, vmas)]


def out_struct(shape, dtype, like: Any) -> jax.ShapeDtypeStruct:
  """``ShapeDtypeStruct`` of a kernel output varying like the (aligned) operand ``like``."""
  varying = _varying(like)
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
