"""Expert-parallel MoE dispatch (shard_map + all-to-all) on 8 simulated CPU devices.

One subprocess sees 8 devices and runs every check; each test asserts on one
part of its JSON report. The reference is the same layer on one device (the
local dropless dispatch), and for a capacity limit a NumPy loop that drops the
same copies the all-to-all buffers cannot hold.
"""

import math
import os
import sys

if __name__ == "__main__":
  # Keeps the flags the suite gives (conftest), adding the simulated devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import pytest

from conftest import report_value
from conftest import run_multidevice_worker
from conftest import WorkerReport

# One xdist worker takes all of this module's tests (pytest.ini: --dist loadfile), so
# the other never sits waiting on the report while the subprocess runs.
pytestmark = pytest.mark.xdist_group("expert_parallel_worker")

E, K, D, F = 8, 2, 16, 32
# (mesh data, fsdp, expert, tensor), batch, impl, capacity factor, dispatch, axis types.
CASES = {
    "ep8": ((1, 1, 8, 1), 8, "ragged_dot", 0.0, "all_to_all", "auto"),
    "ep4_tp2": ((1, 1, 4, 2), 8, "tiled", 0.0, "all_to_all", "auto"),
    "fsdp2_ep2_tp2": ((1, 2, 2, 2), 8, "ragged_dot", 0.0, "all_to_all", "auto"),
    "dp2_ep4": ((2, 1, 4, 1), 8, "dense", 0.0, "all_to_all", "auto"),
    "fsdp8_no_ep": ((1, 8, 1, 1), 8, "ragged_dot", 0.0, "all_to_all", "auto"),
    # Tokens replicated over the expert axis.
    "batch1_ep4_tp2": ((1, 1, 4, 2), 1, "ragged_dot", 0.0, "all_to_all", "auto"),
    # Explicit (sharding-in-types) meshes: the all-to-all path and the GSPMD fallback.
    "explicit_ep2_tp2": ((1, 2, 2, 2), 8, "ragged_dot", 0.0, "all_to_all", "explicit"),
    "explicit_gather": ((1, 2, 2, 2), 8, "ragged_dot", 0.0, "gather", "explicit"),
    "ep8_capacity": ((1, 1, 8, 1), 8, "ragged_dot", 0.75, "all_to_all", "auto"),
    # The same with padding (segment id -1) at the end of every other row.
    "ep8_capacity_padded": ((1, 1, 8, 1), 8, "ragged_dot", 0.75, "all_to_all", "auto"),
    # 2 experts and 2 rows per shard.
    "ep4_tp2_capacity": ((1, 1, 4, 2), 8, "tiled", 0.75, "all_to_all", "auto"),
}
T = 12
PAD = 7  # Padded cases: the last PAD tokens of every even row are padding.


def padding_valid(batch: int, padded: bool) -> np.ndarray:
  """[B, T] bool, False at the padding of a ``*_padded`` case."""
  valid = np.ones((batch, T), bool)
  if padded:
    valid[::2, T - PAD:] = False
  return valid


def dropped_copies(experts: np.ndarray, ep: int, capacity_factor: float,
                   valid: np.ndarray | None = None) -> np.ndarray:
  """Which copies [B, T, k] an all-to-all over ep shards with this capacity drops.

  The B rows are split evenly over the ep devices. Each device walks its real
  tokens' copies in (row, token, slot) order and keeps the first C bound for each
  destination shard (the shard holding experts [s * E/ep, (s + 1) * E/ep)).
  Padding (``valid`` False) is skipped: it takes no slot and is never "dropped".
  """
  b, t, k = experts.shape
  if valid is None:
    valid = np.ones((b, t), bool)
  rows = b // ep
  n = rows * t
  e_local = E // ep
  cap = min(n * min(k, e_local), max(1, math.ceil(capacity_factor * n * k / ep)))
  drop = np.zeros(experts.shape, bool)
  for dev in range(ep):
    flat = experts[dev * rows:(dev + 1) * rows].reshape(-1)
    real = np.repeat(valid[dev * rows:(dev + 1) * rows].reshape(-1), k)
    kept = np.zeros(ep, int)
    mine = np.zeros(flat.shape, bool)
    for i, e in enumerate(flat):
      if not real[i]:
        continue
      dest = e // e_local
      mine[i] = kept[dest] >= cap
      kept[dest] += 1
    drop[dev * rows:(dev + 1) * rows] = mine.reshape(rows, t, k)
  return drop


def _worker(out_path: str, tmp: str) -> None:
  del tmp
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import moe  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import sharding  # pylint: disable=g-import-not-at-top

  report = WorkerReport(out_path)
  mesh_config = mesh_lib.default_mesh_config()
  rules = mesh_lib.logical_rules(mesh_config)

  for name, (sizes, batch, impl, capacity, mode, axis_types) in CASES.items():
    @report.check(name)
    def _(sizes=sizes, batch=batch, impl=impl, capacity=capacity, mode=mode,
          axis_types=axis_types):
      cfg = moe.MoEConfig(num_experts=E, top_k=K, expert_dim=F, impl=impl, tile_size=8,
                          capacity_factor=capacity, expert_parallel=mode)
      layer = moe.MoEFeedForward(cfg)
      x = jax.random.normal(jax.random.key(0), (batch, T, D))
      valid = padding_valid(batch, name.endswith("_padded"))
      meta = masks.make_meta(jnp.broadcast_to(jnp.arange(T), (batch, T)), 4, masks.CLEAN,
                             segment_ids=np.where(valid, 0, -1))
      boxed = jax.eval_shape(lambda: layer.init(jax.random.key(1), x, meta))["params"]
      params = jax.tree.map(lambda b: b.value, layer.init(jax.random.key(1), x, meta)["params"],
                            is_leaf=lambda b: hasattr(b, "names"))
      # A random router, so that every expert gets tokens.
      params["router"] = jax.random.normal(jax.random.key(2), (D, E)) * 3.0

      def loss(params, x):
        y, stats = layer.apply({"params": params}, x, meta)
        return jnp.sum(jnp.sin(y)), (y, stats)

      grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
      (_, (ref_y, ref_stats)), ref_grads = jax.jit(grad_fn)(params, x)

      for axis, size in zip(mesh_lib.MESH_AXES, sizes):
        mesh_config[axis] = size
      mesh_config.axis_types = axis_types
      mesh = mesh_lib.make_mesh(mesh_config)
      p_sharding = mesh_lib.param_shardings(boxed, mesh, rules)
      x_sharding = jax.sharding.NamedSharding(
          mesh, sharding.fit_spec(mesh_lib.batch_spec(rules), x.shape, mesh))
      with mesh_lib.mesh_context(mesh, rules):
        jitted = jax.jit(grad_fn, in_shardings=(p_sharding, x_sharding))
        hlo = jitted.lower(params, x).as_text()
        (_, (y, stats)), grads = jitted(params, x)

      diff = lambda a, b: max(float(jnp.max(jnp.abs(np.asarray(u) - np.asarray(v))))
                              for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      out = {"all_to_all": "all_to_all" in hlo, "shard_map": "shard_map" in hlo or
             "sdy.manual_computation" in hlo,
             "y_diff": diff(y, ref_y), "grad_diff": diff(grads, ref_grads),
             "dropped_fraction": float(stats["dropped_fraction"]),
             "ref_dropped_fraction": float(ref_stats["dropped_fraction"]),
             "y_spec": str(y.sharding.spec),
             "axis_types": [t.name for t in y.sharding.mesh.axis_types]}
      if capacity:
        # The reference: the one-device layer with the dropped copies' weights zeroed.
        experts = moe.route(jnp.einsum("btd,de->bte", x, params["router"]), meta, cfg)[2]
        drop = dropped_copies(np.asarray(experts), sizes[2], capacity, valid)
        want_fraction = drop.sum() / (valid.sum() * K)
        # Padding copies never travel: they add zeros, like dropped ones.
        drop = jnp.asarray(drop | ~valid[..., None])

        def ref_loss(params, x):
          _, weights, experts, _ = moe.route(
              jnp.einsum("btd,de->bte", x, params["router"]), meta, cfg)
          y = moe.local_experts(x.reshape(-1, D), experts.reshape(-1, K),
                                jnp.where(drop, 0.0, weights).reshape(-1, K),
                                params["wi_gate"], params["wi_up"], params["wo"], cfg)
          y = y.reshape(x.shape)
          return jnp.sum(jnp.sin(y)), y

        (_, want), want_grads = jax.value_and_grad(ref_loss, argnums=(0, 1),
                                                   has_aux=True)(params, x)
        out["drop_ref_diff"] = diff(y, want)
        out["drop_ref_grad_diff"] = diff(grads, want_grads)
        out["want_dropped_fraction"] = float(want_fraction)
      return out

  report.write()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  return run_multidevice_worker(__file__, tmp_path_factory, "expert_parallel")


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c[3]])
def test_dropless_dispatch_matches_one_device(report, name):
  r = report_value(report, name)
  assert r["y_diff"] < 1e-5 and r["grad_diff"] < 1e-4, r
  assert r["dropped_fraction"] == 0.0
  sizes, batch, _, _, mode, axis_types = CASES[name]
  assert set(r["axis_types"]) == {axis_types.capitalize()}
  if mode == "gather":  # GSPMD partitions the local dispatch: no shard_map, no all-to-all.
    assert not r["shard_map"] and not r["all_to_all"]
    return
  assert r["shard_map"], "the MoE layer must run token-local inside shard_map"
  # Copies travel by all-to-all exactly when the tokens are split over the expert axis.
  assert r["all_to_all"] == (sizes[2] > 1 and batch % (sizes[0] * sizes[1] * sizes[2]) == 0)
  if batch > 1:  # The output stays split over the batch axes (those of size > 1).
    split = [a for a, n in zip(("data", "fsdp", "expert"), sizes) if n > 1]
    assert all(f"'{a}'" in r["y_spec"] for a in split) and "tensor" not in r["y_spec"], r


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3]])
def test_capacity_drops_the_copies_past_the_buffer(report, name):
  r = report_value(report, name)
  assert r["all_to_all"]
  assert 0.0 < r["want_dropped_fraction"] < 0.5  # The case does exercise drops.
  assert r["dropped_fraction"] == pytest.approx(r["want_dropped_fraction"])
  assert r["drop_ref_diff"] < 1e-5 and r["drop_ref_grad_diff"] < 1e-4, r
  assert r["ref_dropped_fraction"] == 0.0  # One device: no buffer, nothing dropped.


def test_padding_takes_no_capacity_slot():
  # E=8 over ep=2, C=2 slots per destination (as below). Row 0's first token is
  # padding: without it the row's real copies 1,2,3 to shard 0 keep 1 and 2.
  experts = np.array([[[0, 5], [1, 2], [3, 4]], [[7, 6], [5, 4], [6, 0]]])
  valid = np.array([[False, True, True], [True, True, True]])
  drop = dropped_copies(experts, 2, 0.5, valid)
  assert drop.tolist() == [[[False, False], [False, False], [True, False]],
                           [[False, False], [True, True], [True, False]]]


def test_capacity_reference_drops_the_latest_copies_per_destination():
  # E=8 over ep=2 shards: experts 0-3 on shard 0, 4-7 on shard 1; one row per device.
  experts = np.array([[[0, 5], [1, 2], [3, 4]], [[7, 6], [5, 4], [6, 0]]])
  # capacity_factor 0.5 -> C = ceil(0.5 * 3 * 2 / 2) = 2 slots per destination.
  drop = dropped_copies(experts, 2, 0.5)
  # Row 0 sends 0,1,2,3 to shard 0 (keeps 0,1) and 5,4 to shard 1 (keeps both);
  # row 1 sends 7,6,5,4,6 to shard 1 (keeps 7,6) and 0 to shard 0.
  assert drop.tolist() == [[[False, False], [False, True], [True, False]],
                           [[False, False], [True, True], [True, False]]]


def test_collective_bytes_reads_hlo_collectives():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import expert_parallel_comm  # pylint: disable=g-import-not-at-top
  hlo = "\n".join([
      "%a = f32[16,4]{1,0} all-to-all(%x), replica_groups=mesh['axis_0'=8,'axis_1'=2] "
      "{'axis_0'}, dimensions={0}",
      "%g = (bf16[8,2]{1,0}, bf16[8,2]{1,0}) all-gather(%y, %z), replica_groups=[2,4]<=[8]",
      "%r = f32[10]{0} all-reduce(%w), replica_groups={{0,1}}, to_apply=%add",
      "%gs = (f32[2]{0}, f32[16]{0}) all-gather-start(%v), replica_groups=[1,8]<=[8]",
      "%gd = f32[16]{0} all-gather-done(%gs)",
      "%rs = f32[10]{0} all-reduce-start(%w), replica_groups={{0,1}}, to_apply=%add",
      "%rd = f32[10]{0} all-reduce-done(%rs)",
      "%s = f32[10]{0} all-reduce(%w), replica_groups={{0},{1}}, to_apply=%add",
      "%f = f32[10]{0} fusion(%w), kind=kLoop"])
  got = expert_parallel_comm.collective_bytes(hlo, 8)
  assert got["all-to-all"] == 16 * 4 * 4 * 7 / 8  # Groups of 8: receives 7/8.
  # Two bf16 results in groups of 4, plus an async start's f32[16] result in groups of 8.
  assert got["all-gather"] == 2 * 8 * 2 * 2 * 3 / 4 + 16 * 4 * 7 / 8
  # Groups of 2, sync and async (a start without a tuple is its result); groups of 1
  # move nothing; -done ops are not counted again.
  assert got["all-reduce"] == 2 * (10 * 4 * 2 * 1 / 2)


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
