"""Mesh rules tables that would shard the model other than they ask, without a word.

Runs on abstract meshes in this process (no devices): the checks are on the specs
that ``mesh.param_shardings`` builds and on what it tells the user.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from blockdiff_jax.model import mesh as mesh_lib

P = jax.sharding.PartitionSpec

# The logical axes of every weight of a MoE model with a shared expert (from
# build.abstract_params of conftest.small_model_config).
MODEL_WEIGHT_AXES = [
    ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed"), ("embed", "expert"),
    ("embed", "mlp"), ("mlp", "embed"), ("heads", "head_dim", "embed"), ("vocab", "embed"),
    ("embed",), ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")]


def _with(**overrides):
  """DEFAULT_RULES with some logical axes mapped elsewhere, in their own places."""
  return tuple((n, overrides.get(n, a)) for n, a in mesh_lib.DEFAULT_RULES)


def _expert_weight_shardings(rules, monkeypatch):
  """(the expert weight's spec, the warnings mesh logged). Recorded at absl's call, not
  through caplog: an earlier test in the worker may have set absl's logger not to
  propagate to the root handlers caplog reads."""
  mesh = jax.sharding.AbstractMesh((1, 2, 2, 1), mesh_lib.MESH_AXES)
  boxed = {"wi_gate": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 8, 16), np.float32),
                                              ("expert", "embed", "expert_mlp"))}
  warned = []
  monkeypatch.setattr(mesh_lib.logging, "warning",
                      lambda msg, *args: warned.append(msg % args if args else msg))
  spec = mesh_lib.param_shardings(boxed, mesh, rules)["wi_gate"].spec
  return spec, warned


def test_expert_rule_losing_its_mesh_axes_to_embed_is_reported(monkeypatch):
  # The rule asks for the experts over expert x fsdp, but ("embed", "fsdp") comes
  # first in the table and flax then gives the expert axis nothing at all, not even
  # "expert": every device held every expert. It stays flax's layout, but is told.
  spec, warned = _expert_weight_shardings(_with(expert=("expert", "fsdp")), monkeypatch)
  assert spec == P(None, "fsdp", "tensor")
  assert len(warned) == 1, warned
  assert "mesh.rules[11] ('expert' -> ('expert', 'fsdp'))" in warned[0]
  assert "'embed' -> fsdp" in warned[0]

  # The rule listed before embed's takes effect; embed on these weights is then
  # what loses fsdp, and that is said too.
  rules = (("expert", ("expert", "fsdp")),) + _with(expert="expert")
  spec, warned = _expert_weight_shardings(rules, monkeypatch)
  assert spec == P(("expert", "fsdp"), None, "tensor")
  assert len(warned) == 1 and "('embed' -> fsdp) does not shard the 'embed'" in warned[0]


@pytest.mark.parametrize("rules", [
    mesh_lib.DEFAULT_RULES,
    # A fallback rule for the same axis says what to do when the first cannot apply.
    _with(expert=("expert", "fsdp")) + (("expert", "expert"),),
    # Mapping to None on purpose (as test_hardening_sharding does for embed).
    (("expert", ("expert", "fsdp")),) + _with(embed=None),
])
def test_rules_whose_every_axis_gets_what_it_asks_warn_nothing(rules, monkeypatch):
  _, warned = _expert_weight_shardings(rules, monkeypatch)
  assert not warned
  if rules is mesh_lib.DEFAULT_RULES:
    # No weight of the model loses a rule under the defaults.
    assert all(not mesh_lib.lost_rules(names, rules) for names in MODEL_WEIGHT_AXES)


def test_misspelt_logical_axis_in_rules_is_refused():
  # ("experts", ...) matched no array: the run went on with the default layout.
  c = mesh_lib.default_mesh_config()
  c.rules = (("experts", ("expert", "fsdp")),) + mesh_lib.DEFAULT_RULES
  with pytest.raises(ValueError, match=r"mesh.rules\[0\].*unknown logical axis 'experts'"):
    mesh_lib.logical_rules(c)
  # JSON round-trips give lists; the known names still pass.
  c.rules = [list(r) for r in mesh_lib.DEFAULT_RULES]
  assert mesh_lib.logical_rules(c) == mesh_lib.DEFAULT_RULES
