"""Peak FLOP/s of the devices a train step runs on, for MFU.

On a CPU there is no datasheet figure we can trust, so the peak is measured in the same
run by timing a large matmul (the best of a few repeats). On GPUs and TPUs the datasheet
dense peak is used for known devices and the measured matmul otherwise (4096^3 there:
a 1024^3 matmul is a few microseconds of an accelerator, mostly dispatch, so its rate was
a fraction of the peak and the MFU several times too high).

A float32 model on an NVIDIA GPU does not run at the float32 (CUDA core) rate: under
JAX's default matmul precision XLA computes float32 dots on the tensor cores with TF32
inputs, several times faster. Its peak is the TF32 one unless
``jax_default_matmul_precision`` asks for full float32 (or ``NVIDIA_TF32_OVERRIDE=0``
turns TF32 off), else the MFU of a float32 run could exceed 100%.
"""

import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets, matched as substrings of
# ``device_kind`` in this order: the PCIe and NVL parts of a name before its SXM part,
# which the bare name means ("NVIDIA H100 80GB HBM3"). "tf32" is a float32 matmul on the
# tensor cores, "float32" one on the CUDA cores.
_GPU_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "tf32": 378e12, "float32": 51e12}),
    ("H100 NVL", {"bfloat16": 835e12, "tf32": 418e12, "float32": 60e12}),
    ("H200 NVL", {"bfloat16": 835e12, "tf32": 418e12, "float32": 60e12}),
    ("H100", {"bfloat16": 989e12, "tf32": 495e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "tf32": 495e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
)

# ``jax_default_matmul_precision`` values that keep float32 dots in full float32.
_FULL_FLOAT32 = ("highest", "float32", "F32_F32_F32")

# Explicit one-pass dot algorithms that round float32 inputs to bfloat16: the tensor
# cores then run a float32 model at the bfloat16 rate, twice the TF32 one, and an MFU
# against the TF32 peak could reach 200%.
_BFLOAT16_ONE_PASS = ("BF16_BF16_F32",)

# Dense bfloat16 peak FLOP/s of one JAX device (Google Cloud's per-chip figures), keyed
# by its exact ``device_kind`` ("TPU v5" is v5p, "TPU v5 lite" v5e, "TPU v6 lite" v6e).
# A v2/v3 chip has two TensorCores and JAX makes a device of each: half the chip's.
_TPU_PEAKS = {
    "TPU v2": 45e12 / 2,
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}

# ``jax_default_matmul_precision`` values under which a TPU runs a float32 dot as one
# bfloat16 pass of its MXUs (None is JAX's default): the bfloat16 peak applies.
_TPU_ONE_PASS = (None, "default", "fastest", "bfloat16", "DEFAULT", "BF16_BF16_F32")


def float32_matmul_rate() -> str:
  """The rate a float32 matmul runs at on an NVIDIA GPU: "tf32" (JAX's default),
  "float32", or "bfloat16" (under the ``BF16_BF16_F32`` dot algorithm)."""
  precision = str(jax.config.jax_default_matmul_precision)
  if precision in _BFLOAT16_ONE_PASS:  # Not TF32: the override does not touch it.
    return "bfloat16"
  if os.environ.get("NVIDIA_TF32_OVERRIDE", "").strip() == "0":
    return "float32"
  return "float32" if precision in _FULL_FLOAT32 else "tf32"


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


def peak_flops(dtype_name: str = "float32",
               devices: Sequence[jax.Device] | None = None) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained) of the devices a step runs on, for a compute dtype.

  Args:
    dtype_name: the model's compute dtype (``model.dtype``).
    devices: the devices of the step's mesh (``mesh.devices.flat``); default the first
      device alone. MFU divides the whole step's FLOPs by this peak, so on a mesh of n
      GPUs it must be n times one GPU's: one GPU's peak gave an n-fold MFU. Simulated
      CPU devices of one process share that host's cores and count once per process.
  """
  devices = [jax.devices()[0]] if devices is None else list(devices)
  if not devices:
    raise ValueError("peak_flops needs at least one device, got an empty list")
  dev = devices[0]
  if dev.platform == "cpu":
    count = len({getattr(d, "process_index", 0) for d in devices})
  else:
    count = len(devices)
  peak, how = _one_device_peak(dev, dtype_name)
  if count > 1:
    how = f"{count} x {how}"
  return count * peak, how


def _one_device_peak(dev, dtype_name: str) -> tuple[float, str]:
  """One device's peak: its datasheet figure where known, else a timed matmul."""
  if dev.platform == "gpu":
    rate = float32_matmul_rate() if dtype_name == "float32" else dtype_name
    how = dtype_name if rate == dtype_name else f"{dtype_name} ({rate} matmuls)"
    # The tensor cores of these parts run float16 at the bfloat16 rate (datasheets).
    rate = "bfloat16" if rate == "float16" else rate
    for name, peaks in _GPU_PEAKS:
      if name in dev.device_kind and rate in peaks:
        return peaks[rate], f"datasheet {dev.device_kind} {how}"
  if dev.platform == "tpu" and dev.device_kind in _TPU_PEAKS:
    # Other precisions run a float32 dot as 3 or 6 bfloat16 passes: timed below.
    precision = jax.config.jax_default_matmul_precision
    if dtype_name == "bfloat16" or (dtype_name == "float32" and precision in _TPU_ONE_PASS):
      how = dtype_name if dtype_name == "bfloat16" else f"{dtype_name} (bfloat16 matmuls)"
      return _TPU_PEAKS[dev.device_kind], f"datasheet {dev.device_kind} {how}"
  n = 1024 if dev.platform == "cpu" else 4096
  # The model's own dtype: a float16 model timed a float32 (on GPUs TF32) matmul, half
  # its rate, and reported twice its MFU.
  dtype = jnp.dtype(dtype_name)
  return measure_matmul_peak(dtype, n), f"measured {n}^3 {dtype_name} matmul on {dev.device_kind}"
