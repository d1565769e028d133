"""Peak FLOP/s of the device, for MFU.

On a CPU there is no datasheet figure we can trust, so the peak is measured in the same
run by timing a large matmul (the best of a few repeats). On GPUs the datasheet dense
peak is used for known devices and the measured matmul otherwise.
"""

import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets (SXM parts).
_GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def measure_matmul_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of ``repeats`` timed n×n×n matmuls on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops(dtype_name: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained) for the default device and compute dtype."""
  dev = jax.devices()[0]
  if dev.platform == "gpu":
    for name, peaks in _GPU_PEAKS.items():
      if name in dev.device_kind and dtype_name in peaks:
        return peaks[dtype_name], f"datasheet {dev.device_kind} {dtype_name}"
  n = 4096 if dev.platform == "gpu" else 1024
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  return measure_matmul_peak(dtype, n), f"measured {n}^3 {dtype_name} matmul on {dev.device_kind}"
