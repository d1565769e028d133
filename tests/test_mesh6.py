"""MoE router statistics and multi-process start-up settings (hardening, mesh6).

Each statistic is checked against its definition written out in NumPy; the start-up
settings against what ``jax.distributed.initialize`` is handed.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":
  # The expert-parallel worker: 4 simulated CPU devices, set before jax is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import moe
from blockdiff_jax.train import distributed

E, K, D = 4, 2, 8
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _layer_stats(router_func, router, x, meta):
  """(stats, logits) of a dense-dispatch MoE layer with the given router weights."""
  cfg = moe.MoEConfig(num_experts=E, top_k=K, expert_dim=16, impl="dense",
                      router_func=router_func)
  layer = moe.MoEFeedForward(cfg)
  params = layer.init(jax.random.key(1), x, meta.broadcast_to(x.shape[:2]))["params"]
  params = {**params, "router": params["router"].replace_boxed(router)}
  _, stats = layer.apply({"params": params}, x, meta)
  return stats, np.einsum("btd,de->bte", np.asarray(x), np.asarray(router))


def _balance_reference(logits, router_func, valid):
  """E * sum_e f_e * P_e over real tokens: f the top-k share of copies, P the mean of the
  per-token router distribution (sigmoid scores normalised to sum to 1, DeepSeek-V3)."""
  logits = logits[valid]
  if router_func == "softmax":
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    dist = scores
  else:
    scores = 1 / (1 + np.exp(-logits))
    dist = scores / scores.sum(-1, keepdims=True)
  top = np.argsort(-scores, -1, kind="stable")[:, :K]
  frac = np.bincount(top.ravel(), minlength=E) / (len(logits) * K)
  return E * np.sum(frac * dist.mean(0))


@pytest.mark.parametrize("router_func", ["softmax", "sigmoid"])
def test_load_balance_loss_is_the_switch_formula_for_either_router(router_func):
  """Sigmoid scores entered the formula unnormalised: 2.0 (E/2) where the balance loss
  of the same routing is 1, and a router could lower it by lowering every logit."""
  b, t = 2, 6
  x = jax.random.normal(jax.random.key(0), (b, t, D))
  valid = np.ones((b, t), bool)
  valid[1, 4:] = False
  meta = masks.make_meta(jnp.broadcast_to(jnp.arange(t), (b, t)), 2, masks.CLEAN,
                         segment_ids=np.where(valid, 0, -1))
  router = jax.random.normal(jax.random.key(2), (D, E)) * 2.0
  stats, logits = _layer_stats(router_func, router, x, meta)
  np.testing.assert_allclose(stats["load_balance_loss"],
                             _balance_reference(logits, router_func, valid), rtol=1e-5)
  # A zero router: every token has equal scores and picks experts 0 and 1 (f = 1/2 each),
  # while P is uniform (1/E): E * (1/2 + 1/2) / E = 1 whatever the router function.
  stats, _ = _layer_stats(router_func, jnp.zeros((D, E)), x, meta)
  np.testing.assert_allclose(stats["load_balance_loss"], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(stats["tokens_per_expert"], [valid.sum()] * 2 + [0] * 2)


def test_one_metadata_row_for_the_batch_gives_the_batch_statistics():
  """A [1, T] metadata row broadcast over B rows (TokenMeta.broadcast_to's form) routed
  the same but divided B rows' counts by one row's tokens: the load-balance loss came
  out B^2 times too large, the z-loss B times."""
  b, t = 3, 8
  x = jax.random.normal(jax.random.key(0), (b, t, D))
  seg = np.where(np.arange(t) < 6, 0, -1)[None]  # The row's last 2 tokens are padding.
  row = masks.make_meta(jnp.arange(t)[None], 4, masks.CLEAN, segment_ids=seg)
  router = jax.random.normal(jax.random.key(2), (D, E))
  stats, logits = _layer_stats("softmax", router, x, row)
  valid = np.broadcast_to(seg >= 0, (b, t))
  np.testing.assert_allclose(stats["load_balance_loss"],
                             _balance_reference(logits, "softmax", valid), rtol=1e-5)
  z = np.log(np.exp(logits[valid]).sum(-1))
  np.testing.assert_allclose(stats["router_z_loss"], np.mean(z ** 2), rtol=1e-5)
  assert float(np.sum(stats["tokens_per_expert"])) == valid.sum() * K


def _row_meta_worker(out_path: str) -> None:
  """Writes the largest output difference of an expert-parallel MoE layer given one
  metadata row for its batch against the same layer on one device (or the error)."""
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  b, t = 4, 8
  layer = moe.MoEFeedForward(moe.MoEConfig(num_experts=E, top_k=K, expert_dim=16))
  x = jax.random.normal(jax.random.key(0), (b, t, D))
  row = masks.make_meta(jnp.arange(t)[None], 4, masks.CLEAN,
                        segment_ids=np.where(np.arange(t) < 6, 0, -1)[None])
  params = layer.init(jax.random.key(1), x, row.broadcast_to((b, t)))
  want = layer.apply(params, x, row.broadcast_to((b, t)))[0]
  mesh_config = mesh_lib.default_mesh_config()
  mesh_config.fsdp, mesh_config.expert = 1, 4
  mesh = mesh_lib.make_mesh(mesh_config)
  with mesh_lib.mesh_context(mesh, mesh_lib.logical_rules(mesh_config)):
    try:
      got = jax.jit(lambda p, x: layer.apply(p, x, row)[0])(params, x)
      # Padding copies do not travel under expert parallelism (they give zeros).
      valid = np.broadcast_to(np.arange(t) < 6, (b, t))
      result = float(np.abs(np.asarray(got) - np.asarray(want))[valid].max())
    except ValueError as e:
      result = f"error: {e}"[:400]
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump({"diff": result, "devices": jax.device_count()}, f)


def test_one_metadata_row_for_the_batch_runs_under_expert_parallelism(tmp_path):
  """On an expert-parallel mesh the [1, T] padding mask entered the shard_map split over
  the batch: "axis sizes that are not evenly divisible by the corresponding mesh axis"."""
  out = tmp_path / "report.json"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], check=True,
                 cwd=repo, env=env)
  report = json.loads(out.read_text())
  assert report["devices"] == 4
  assert isinstance(report["diff"], float) and report["diff"] < 1e-5, report["diff"]


@pytest.fixture
def clean_env(monkeypatch):
  for k in ENV:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, "_initialized", False)
  return monkeypatch


def test_several_processes_without_a_process_id_are_refused(clean_env):
  """Without JAX_PROCESS_ID every process of a 2-process job became process 0; each
  waited for the other to register and both aborted ("another task died")."""
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  calls = []
  clean_env.setattr(distributed.jax.distributed, "initialize",
                    lambda **kw: calls.append(kw))
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    distributed.settings()
  with pytest.raises(ValueError, match="num_processes=2 needs this process's id"):
    distributed.initialize()
  assert not calls
  clean_env.setenv("JAX_PROCESS_ID", "1")
  assert distributed.settings() == ("localhost:1234", 2, 1)


def test_auto_leaves_what_is_not_given_to_jax(clean_env):
  """With auto=True the id JAX would detect (SLURM_PROCID) was overridden by 0."""
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  calls = []
  clean_env.setattr(distributed.jax.distributed, "initialize",
                    lambda **kw: calls.append(kw))
  clean_env.setattr(distributed.jax, "process_index", lambda: 1)
  assert distributed.initialize(auto=True, timeout_s=7)
  assert calls == [{"coordinator_address": "localhost:1234", "num_processes": 2,
                    "process_id": None, "initialization_timeout": 7}]
  # Nothing given: JAX detects everything, as before.
  calls.clear()
  for k in ENV:
    clean_env.delenv(k, raising=False)
  clean_env.setattr(distributed, "_initialized", False)
  assert distributed.initialize(auto=True)
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                    "initialization_timeout": 300}]


if __name__ == "__main__":
  _row_meta_worker(sys.argv[1])
