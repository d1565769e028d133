"""The suite's guard against running out of memory mappings (conftest).

Each compiled XLA:CPU program maps its code into memory, and JAX keeps the programs of
every cached jitted function. ``release_compiled_programs`` drops them when a test module
ends; this checks that doing so really unmaps them on this jaxlib, since a worker that
keeps them all passes Linux's vm.max_map_count within one suite run and segfaults.
"""

import os

import jax
import jax.numpy as jnp
import pytest

from conftest import release_compiled_programs_now

MAPS = "/proc/self/maps"


def _mappings() -> int:
  with open(MAPS, encoding="utf-8") as f:
    return sum(1 for _ in f)


@pytest.mark.skipif(not os.path.exists(MAPS), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("programs", [24, 48])
def test_releasing_compiled_programs_unmaps_their_code(programs):
  jax.clear_caches()
  before = _mappings()
  live = []  # The jitted functions stay alive: only the caches are released.
  for i in range(programs):
    fn = jax.jit(lambda x, i=i: jnp.tanh(x * (i + 1)).sum())
    fn(jnp.ones((i + 1,), jnp.float32)).block_until_ready()
    live.append(fn)
  grown = _mappings() - before
  assert grown >= programs, f"{programs} programs added only {grown} mappings"
  release_compiled_programs_now()
  left = _mappings() - before
  assert left <= grown // 2, f"still {left} of {grown} new mappings after release"
