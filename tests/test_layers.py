"""The package's import graph: no cycle, and no import up the layer order.

The order, bottom to top, written once (a module may import its own layer and
the layers below it):

  masks, metrics_writer, pallas_kernels  ->  model, diffusion, data, interop
  ->  checkpoint  ->  train  ->  sampling  ->  serving, evaluation  ->  config, main

Imports inside functions count too (they are still dependencies).
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("blockdiff_jax", "pallas_kernels")

LAYERS = (
    ("blockdiff_jax.masks", "blockdiff_jax.metrics_writer", "pallas_kernels"),
    ("blockdiff_jax.model", "blockdiff_jax.diffusion", "blockdiff_jax.data",
     "blockdiff_jax.interop"),
    ("blockdiff_jax.checkpoint",),
    ("blockdiff_jax.train",),
    ("blockdiff_jax.sampling",),
    ("blockdiff_jax.serving", "blockdiff_jax.evaluation"),
    ("blockdiff_jax.config", "blockdiff_jax.main"),
)
# blockdiff_jax/__init__.py (the version string) sits below everything.
ROOT = "blockdiff_jax"


def layer_of(module: str) -> int:
  if module == ROOT:
    return -1
  for rank, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return rank
  raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(name: str, modules: set[str]) -> str | None:
  """The longest known module that ``name`` (a module or module.attribute) names."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def import_graph() -> dict[str, set[str]]:
  """{module: modules of this repository it imports}, from the source (ast)."""
  files = {}
  for package in PACKAGES:
    for dirpath, _, names in os.walk(os.path.join(REPO, package)):
      for n in names:
        if n.endswith(".py"):
          files[_module_name(os.path.join(dirpath, n))] = os.path.join(dirpath, n)
  modules = set(files)
  graph = {}
  for module, path in files.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # ``from pkg import mod`` depends on pkg.mod; ``from mod import name`` on mod.
        names = [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for name in names:
        target = _resolve(name, modules)
        # Its own ancestor packages are not dependencies of a module (Python runs
        # their __init__ first whatever the module imports).
        if target is not None and not (module + ".").startswith(target + "."):
          deps.add(target)
    graph[module] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_every_module_has_a_layer():
  for module in import_graph():
    layer_of(module)


def test_no_import_runs_up_the_layers():
  upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
            for m, deps in sorted(import_graph().items()) for d in sorted(deps)
            if layer_of(d) > layer_of(m)]
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_sampling_and_evaluation_never_import_train():
  graph = import_graph()
  bad = [(m, d) for m, deps in graph.items() for d in deps
         if m.startswith(("blockdiff_jax.sampling", "blockdiff_jax.evaluation"))
         and d.startswith("blockdiff_jax.train")]
  assert not bad, bad


@pytest.mark.parametrize("graph, expect_cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}, True),
])
def test_cycle_finder_finds_cycles(graph, expect_cycle):
  assert (find_cycle(graph) is not None) == expect_cycle


def test_upward_import_is_detected(tmp_path):
  assert layer_of("blockdiff_jax.train.trainer") > layer_of("blockdiff_jax.model.build")
  assert layer_of("pallas_kernels.gmm.ops") < layer_of("blockdiff_jax.model.moe")
