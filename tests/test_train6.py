"""Hardening of blockdiff_jax/train (train6): the MFU peak of TPUs and unknown accelerators."""

import types

import jax
import jax.numpy as jnp
import pytest

from blockdiff_jax.train import hardware


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind, process_index=0)


@pytest.fixture
def timed(monkeypatch):
  """Replaces the timed matmul by a fixed rate, recording the sizes it was asked for."""
  sizes = []

  def measure(dtype, n=1024, repeats=5):
    del dtype, repeats
    sizes.append(n)
    return 1e12

  monkeypatch.setattr(hardware, "measure_matmul_peak", measure)
  return sizes


@pytest.mark.parametrize("kind, peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12),
                                        ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
                                        ("TPU v3", 61.5e12)])
def test_a_known_tpu_uses_its_datasheet_peak(timed, kind, peak):
  """A TPU's peak was a timed 1024^3 matmul: microseconds of dispatch on a chip of
  hundreds of TFLOP/s, so the MFU it divided by read several times too high."""
  got, how = hardware.peak_flops("bfloat16", [_device("tpu", kind)])
  assert got == peak and how == f"datasheet {kind} bfloat16"
  # JAX's default precision runs a float32 dot on a TPU as one bfloat16 pass.
  assert hardware.peak_flops("float32", [_device("tpu", kind)])[0] == peak
  # A mesh of 4 devices has 4 times one device's peak.
  assert hardware.peak_flops("bfloat16", [_device("tpu", kind)] * 4)[0] == 4 * peak
  assert not timed


def test_a_full_precision_float32_tpu_run_is_timed_at_4096(timed):
  """Full float32 precision runs several bfloat16 passes: not the datasheet rate."""
  with jax.default_matmul_precision("highest"):
    peak, how = hardware.peak_flops("float32", [_device("tpu", "TPU v5 lite")])
  assert (peak, timed) == (1e12, [4096]) and how.startswith("measured 4096^3")


@pytest.mark.parametrize("platform, kind", [("tpu", "TPU7x"), ("gpu", "NVIDIA B300"),
                                            ("rocm", "AMD Instinct MI300X")])
def test_an_unknown_accelerator_times_a_large_matmul(timed, platform, kind):
  """Only a CPU times the small 1024^3 matmul; any accelerator times 4096^3."""
  for dtype in ("bfloat16", "float32"):
    _, how = hardware.peak_flops(dtype, [_device(platform, kind)])
    assert how == f"measured 4096^3 {dtype} matmul on {kind}"
  assert timed == [4096, 4096]
  hardware.peak_flops("float32", [_device("cpu", "cpu")])
  assert timed[-1] == 1024


def test_a_float16_model_is_measured_and_looked_up_as_float16(monkeypatch):
  """A float16 model (model.dtype accepts it) timed a float32 matmul, TF32 on a GPU at
  half the float16 rate, and a known GPU had no float16 entry: MFU read 2x too high."""
  dtypes = []
  monkeypatch.setattr(hardware, "measure_matmul_peak",
                      lambda dtype, n=1024, repeats=5: dtypes.append(dtype) or 1e12)
  monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
  peak, how = hardware.peak_flops("float16", [_device("gpu", "NVIDIA H100 80GB HBM3")])
  assert (peak, how) == (989e12, "datasheet NVIDIA H100 80GB HBM3 float16")
  assert hardware.peak_flops("float16", [_device("gpu", "NVIDIA A100-SXM4-80GB")])[0] == 312e12
  assert not dtypes
  for dev in (_device("gpu", "NVIDIA B300"), _device("cpu", "cpu")):
    hardware.peak_flops("float16", [dev])
  assert [jnp.dtype(d) for d in dtypes] == [jnp.float16, jnp.float16]
