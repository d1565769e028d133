"""Whether a Pallas kernel runs compiled or in the interpreter: a property of the backend."""

import functools
from typing import Callable

import jax


def resolve_interpret(interpret: bool | None) -> bool:
  """``interpret`` as given, or when None whether the default backend lacks Triton.

  Only GPUs compile these (Triton) kernels; on CPU and TPU they run in the Pallas
  interpreter. Pass True/False to override (e.g. the interpreter on a GPU to debug).
  """
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def call(kernel_fn: Callable, interpret: bool | None, *args, **kwargs):
  """``kernel_fn(*args, **kwargs, interpret=...)`` with ``interpret`` decided by the backend.

  With ``interpret=None`` the choice is made when the program is lowered, per
  platform (``jax.lax.platform_dependent``): the compiled Triton kernel for GPUs,
  the interpreter elsewhere. So a function exported for CUDA from a CPU host holds
  the real kernel, and the same jitted code runs on either.
  """
  if interpret is not None:
    return kernel_fn(*args, **kwargs, interpret=bool(interpret))
  compiled = functools.partial(kernel_fn, **kwargs, interpret=False)
  return jax.lax.platform_dependent(
      *args, cuda=compiled, rocm=compiled,
      default=functools.partial(kernel_fn, **kwargs, interpret=True))


def static_scale(op: str, scale, head_dim: int) -> float:
  """The logit scale as a Python float (``head_dim ** -0.5`` when None).

  The kernels compile the scale in, so a traced one (e.g. a jitted argument) is
  refused by name, where ``float`` raised a ConcretizationTypeError.
  """
  if scale is None:
    return head_dim ** -0.5
  if isinstance(scale, jax.core.Tracer):
    raise ValueError(f"{op}: scale must be a static number (the kernel compiles it in), "
                     f"got a traced {scale.aval.str_short()}; pass a Python float, or "
                     "multiply q by it and pass scale=1.0")
  return float(scale)
