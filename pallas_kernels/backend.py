"""Whether a Pallas kernel runs compiled or in the interpreter: a property of the backend."""

import jax


def resolve_interpret(interpret: bool | None) -> bool:
  """``interpret`` as given, or when None whether the default backend lacks Triton.

  Only GPUs compile these (Triton) kernels; on CPU and TPU they run in the Pallas
  interpreter. Pass True/False to override (e.g. the interpreter on a GPU to debug).
  """
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)
