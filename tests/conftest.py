"""Shared fixtures: tiny configs and models built in-process (no network, no GPU)."""

import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config_file(name):
  """``get_config()`` of ``configs/<name>.py``."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture
def tiny_config():
  return load_config_file("tiny")


# Kernel tests: on a GPU the same tests run the compiled Triton kernels.
INTERPRET = jax.default_backend() != "gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def full_precision_matmuls():
  """XLA's default fp32 matmul on GPU is TF32; the kernels' fp32 path is exact."""
  with jax.default_matmul_precision("highest"):
    yield
