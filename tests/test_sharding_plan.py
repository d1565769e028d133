"""Memory plans on abstract meshes (no devices allocated) and mesh/rules validation."""

import os
import sys

import jax
import ml_collections
import pytest

from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import sharding
from blockdiff_jax.train import plan

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import chatdlm_7b  # pylint: disable=g-import-not-at-top,wrong-import-position

P = jax.sharding.PartitionSpec
GIB = 2 ** 30


def _config_7b(**mesh):
  c = chatdlm_7b.get_config()
  c.mesh = mesh_lib.default_mesh_config()
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def test_plan_7b_on_8_devices():
  c = _config_7b()
  r = plan.plan(c, num_devices=8, memory_gib=80)
  assert r["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
  assert r["params"] == 6_917_031_936  # The count in configs/chatdlm_7b.py.
  b = r["bytes"]
  # ZeRO-3: fp32 params, gradients and both Adam moments are split 8 ways.
  assert b["params (fp32)"] == pytest.approx(r["params"] * 4 / 8, rel=1e-3)
  assert b["optimizer state"] == pytest.approx(2 * b["params (fp32)"], rel=1e-6)
  assert r["total_bytes"] == sum(b.values())
  # The config accumulates 8 micro-batches: one sequence per device per pass fits...
  assert c.train.grad_accum_steps == 8 and r["fits"]
  # ...while 8 sequences x 8,192 tokens per device with the materialized XLA mask do not.
  c.train.grad_accum_steps = 1
  assert not plan.plan(c, num_devices=8, memory_gib=80)["fits"]
  # ...micro-batches of one sequence per device do.
  c.train.grad_accum_steps = 8
  r = plan.plan(c, num_devices=8, memory_gib=80)
  assert r["fits"] and r["total_bytes"] < 40 * GIB
  assert "fits in 80.0 GiB" in plan.format_table(r)


def test_plan_expert_and_tensor_axes_shrink_their_parts():
  base = plan.plan(_config_7b(), num_devices=8)["bytes"]
  ep = plan.plan(_config_7b(fsdp=1, expert=-1), num_devices=8)["bytes"]
  # Expert weights (24 x 64 x 3 x 2048 x 640) and routers split 8 ways, the rest replicated.
  experts = 24 * 64 * 3 * 2048 * 640 + 24 * 2048 * 64
  assert ep["params (fp32)"] == pytest.approx(4 * (6_917_031_936 - experts + experts / 8),
                                              rel=1e-6)
  tp = plan.plan(_config_7b(fsdp=1, tensor=-1), num_devices=8)["bytes"]
  assert tp["activations: logits + loss"] == base["activations: logits + loss"]  # 8 seqs/8 vocab.


def test_plan_counts_all_to_all_buffers():
  working = "activations: one layer working set"

  def layer_bytes(capacity, **mesh):
    c = _config_7b(**mesh)
    c.model.moe.capacity_factor = capacity
    return plan.plan(c, num_devices=8)["bytes"][working]

  # Without an expert axis there is no buffer: the capacity changes nothing.
  assert layer_bytes(0.0) == layer_bytes(1.25)
  # With 8 expert shards the dropless buffers hold ep * min(k, E/ep) = 8 * 2 slots per
  # token (8x its k = 2 copies); a capacity factor of 1 brings that down to k.
  dropless, capped = layer_bytes(0.0, fsdp=1, expert=8), layer_bytes(1.0, fsdp=1, expert=8)
  assert dropless > capped
  c = _config_7b(fsdp=1, expert=8)
  b = c.data.batch_size // c.train.grad_accum_steps // 8  # Sequences per device.
  d, f, k = c.model.d_model, c.model.moe.expert_dim, c.model.moe.top_k
  copies = b * 2 * c.data.seq_len * k
  per_copy = (3 * f + 4 * d) * 2  # bf16: hidden, copies in/out, both send buffers.
  # The working set counts forward values and their gradients (x2).
  assert dropless - capped == pytest.approx(2 * (8 - 1) * copies * per_copy, rel=1e-6)


def test_plan_run_writes_json(tmp_path, capsys):
  c = _config_7b()
  c.mesh.plan_devices = 8
  c.train.grad_accum_steps = 8
  r = plan.run(c, str(tmp_path))
  assert (tmp_path / "plan.json").exists() and r["fits"]
  assert "optimizer state" in capsys.readouterr().out


@pytest.mark.parametrize("sizes,devices,expected", [
    ((1, -1, 1, 1), 8, (1, 8, 1, 1)),
    ((2, 2, -1, 1), 8, (2, 2, 2, 1)),
    ((1, 2, 2, 2), 8, (1, 2, 2, 2)),
])
def test_mesh_shape(sizes, devices, expected):
  c = mesh_lib.default_mesh_config()
  c.data, c.fsdp, c.expert, c.tensor = sizes
  assert mesh_lib.mesh_shape(c, devices) == expected


@pytest.mark.parametrize("sizes,error", [
    ((1, -1, -1, 1), "at most one"),
    ((3, -1, 1, 1), "not divisible"),
    ((2, 2, 1, 1), "has 4 devices, but 8"),
    ((0, -1, 1, 1), "mesh.data=0"),
])
def test_mesh_shape_errors(sizes, error):
  c = mesh_lib.default_mesh_config()
  c.data, c.fsdp, c.expert, c.tensor = sizes
  with pytest.raises(ValueError, match=error):
    mesh_lib.mesh_shape(c, 8)


def test_rules_validation_and_json_round_trip():
  c = mesh_lib.default_mesh_config()
  as_json = ml_collections.ConfigDict(c.to_dict())
  as_json.rules = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])]
                   for r in c.rules]
  assert mesh_lib.logical_rules(as_json) == mesh_lib.logical_rules(c)
  c.rules = (("embed", "fsdpp"),)
  with pytest.raises(ValueError, match="'embed' to unknown mesh axes \\['fsdpp'\\]"):
    mesh_lib.logical_rules(c)


def test_fit_spec_drops_axes_that_do_not_divide():
  mesh = jax.sharding.AbstractMesh((2, 2, 1, 4), mesh_lib.MESH_AXES)
  assert sharding.fit_spec(P("tensor"), (2,), mesh) == P(None)  # 2 kv heads, tensor=4.
  assert sharding.fit_spec(P(("data", "fsdp")), (6,), mesh) == P("data")
  assert sharding.fit_spec(P(("data", "fsdp"), None), (8, 3), mesh) == P(("data", "fsdp"),
                                                                               None)


def test_plan_counts_the_decode_cache_full_and_hierarchical():
  c = _config_7b()
  c.sample.max_len = 131072
  c.sample.kv_chunk, c.sample.kv_rank, c.sample.kv_window = 256, 8, 2
  dc = plan.plan(c, num_devices=8)["decode_cache"]
  m = c.model
  per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2  # K and V in bf16.
  assert dc["rows"] == c.serve.slots and dc["length"] == 131072
  assert dc["full"] >= dc["rows"] * 131072 * per_token
  # Rank 8 of a 256 x head_dim chunk: 8 * (256 + head_dim) / (256 * head_dim), + the ring.
  ratio = 8 * (256 + m.head_dim) / (256 * m.head_dim)
  assert ratio < dc["hierarchical"] / dc["full"] < ratio + 0.01 < 0.15
  assert "of full" in plan.format_table(plan.plan(c, num_devices=8))
