"""The suite's set-up: its schedule hint (conftest.SLOW_MODULES) names modules that exist,
and its XLA flags are the ones this jaxlib accepts."""

import os

import conftest


def test_slow_modules_are_test_modules_listed_once():
  here = os.path.dirname(os.path.abspath(__file__))
  present = {n for n in os.listdir(here) if n.startswith("test_") and n.endswith(".py")}
  assert set(conftest.SLOW_MODULES) <= present, set(conftest.SLOW_MODULES) - present
  assert len(set(conftest.SLOW_MODULES)) == len(conftest.SLOW_MODULES)


def test_xla_flags_this_jaxlib_rejects_are_left_out():
  """An unknown flag would abort every test process; conftest probes each one."""
  assert conftest.xla_accepts("--xla_backend_optimization_level=0")
  assert not conftest.xla_accepts("--xla_no_such_flag_in_any_jaxlib=1")
  for name, value in conftest.TEST_XLA_FLAGS.items():  # Set, by conftest or its caller.
    if conftest.xla_accepts(f"--{name}={value}"):
      assert f"--{name}=" in os.environ["XLA_FLAGS"]
