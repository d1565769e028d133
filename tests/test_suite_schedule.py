"""The suite's schedule hint (conftest.SLOW_MODULES) names modules that exist."""

import os

import conftest


def test_slow_modules_are_test_modules_listed_once():
  here = os.path.dirname(os.path.abspath(__file__))
  present = {n for n in os.listdir(here) if n.startswith("test_") and n.endswith(".py")}
  assert set(conftest.SLOW_MODULES) <= present, set(conftest.SLOW_MODULES) - present
  assert len(set(conftest.SLOW_MODULES)) == len(conftest.SLOW_MODULES)
