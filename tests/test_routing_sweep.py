"""dMoE routing sweeps (evaluation/routing_sweep.py) against slow references."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import routing_sweep
from blockdiff_jax.model import moe as moe_lib
from blockdiff_jax.model import transformer

E, K, BLOCK, LENGTH, VOCAB = 8, 2, 8, 32, 40


def _per_block_reference(experts, allowed, meta):
  """Distinct experts and coreset size per (row, stream, block), by Python loops."""
  experts, allowed = np.asarray(experts), np.asarray(allowed)
  stream, blocks, seg = (np.asarray(a) for a in (meta.stream, meta.block_ids, meta.segment_ids))
  out = {"noisy": ([], []), "clean": ([], [])}
  for b in range(experts.shape[0]):
    keys = {(int(stream[b, t]), int(blocks[b, t])) for t in range(experts.shape[1])}
    for s, blk in sorted(keys):
      toks = [t for t in range(experts.shape[1])
              if stream[b, t] == s and blocks[b, t] == blk and seg[b, t] >= 0]
      if not toks:
        continue
      used = {int(e) for t in toks for e in experts[b, t]}
      core = {e for t in toks for e in range(allowed.shape[-1]) if allowed[b, t, e]}
      name = "noisy" if s == masks.NOISY else "clean"
      out[name][0].append(len(used))
      out[name][1].append(len(core))
  return out


@pytest.mark.parametrize("mode", ["token", "block"])
def test_per_block_counts_match_loop_reference(mode):
  b = 3
  meta = masks.training_meta(LENGTH, BLOCK, b)
  # Padding in the last row's tail: those tokens must not count.
  seg = np.zeros((b, 2 * LENGTH), np.int32)
  seg[2, LENGTH - 5:LENGTH] = -1
  seg[2, 2 * LENGTH - 5:] = -1
  meta = dataclasses.replace(meta, segment_ids=jnp.asarray(seg))
  logits = jax.random.normal(jax.random.key(0), (b, 2 * LENGTH, E)) * 2.0
  cfg = moe_lib.MoEConfig(num_experts=E, top_k=K, router_mode=mode, block_coverage=0.7,
                          block_min_experts=K)
  _, _, experts, allowed = moe_lib.route(logits, meta, cfg)
  got = jax.device_get(routing_sweep.per_block_counts(experts, allowed, meta, E))
  want = _per_block_reference(experts, allowed, meta)
  for name, (unique, core) in want.items():
    assert got[f"{name}_groups"] == len(unique)
    assert got[f"{name}_unique_sum"] == sum(unique)
    assert got[f"{name}_coreset_sum"] == sum(core)
    if mode == "token":
      assert all(c == E for c in core)
    assert all(u <= c for u, c in zip(unique, core))


def test_settings_grid_clips_and_dedupes_minimum_sizes():
  grid = routing_sweep.settings_grid(4, 2, [0.5, 0.9], [2, 4, 2], keep_full=True)
  assert [s.name for s in grid] == ["token", "block p=0.5 min=2", "block p=0.9 min=2",
                                    "block p=0.5 min=4", "block p=0.9 min=4"]
  # min = E is token routing (test_full_coverage_and_minimum_e_equals_token_routing).
  assert [s.name for s in routing_sweep.settings_grid(4, 2, [0.5], [1, 2, 4, 9])] == [
      "token", "block p=0.5 min=2"]


@pytest.fixture(scope="module")
def tiny_model():
  cfg = transformer.TransformerConfig(
      vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
      mlp_dim=64, moe=moe_lib.MoEConfig(num_experts=E, top_k=K, expert_dim=32, impl="dense",
                                        block_min_experts=K))
  model = transformer.Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  params = nn.unbox(model.init(jax.random.key(0), tokens, meta)["params"])
  # A sharper router than init, so block coresets actually drop experts.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 8.0 if "router" in jax.tree_util.keystr(p) else v, params)
  rng = np.random.default_rng(0)
  batches = [{"tokens": jnp.asarray(rng.integers(0, VOCAB - 1, (2, LENGTH)), jnp.int32),
              "loss_mask": jnp.ones((2, LENGTH), jnp.float32)} for _ in range(2)]
  obj = losses.BlockDiffusionObjective(block_size=BLOCK, mask_id=VOCAB - 1)
  return model, params, batches, obj


def test_full_coverage_and_minimum_e_equals_token_routing(tiny_model):
  model, params, batches, obj = tiny_model
  tok = routing_sweep.evaluate_setting(model, params, batches, obj,
                                       routing_sweep.RoutingSetting("token"), seed=3)
  blk = routing_sweep.evaluate_setting(model, params, batches, obj,
                                       routing_sweep.RoutingSetting("block", 1.0, E), seed=3)
  for key in ("nelbo", "masked_ce", "masked_accuracy", "unique_experts_noisy_block",
              "unique_experts_clean_block", "unique_experts_per_forward"):
    assert tok[key] == blk[key], key
  assert tok["coreset_noisy_block"] == E


def test_unique_experts_shrink_with_coverage_and_same_noise_everywhere(tiny_model):
  model, params, batches, obj = tiny_model
  settings = routing_sweep.settings_grid(E, K, [1.0, 0.9, 0.7, 0.5, 0.3], [K])
  rows = routing_sweep.sweep(model, params, batches, obj, settings, seed=1)
  # The first MoE layer's input does not depend on routing, so its coreset is the top-m
  # experts by block share with m non-increasing in p, and it uses min(m, voted) of them.
  first = [r["unique_experts_noisy_block_per_layer"][0] for r in rows[1:]]
  assert all(a >= b - 1e-9 for a, b in zip(first, first[1:])), first
  assert first[-1] < rows[0]["unique_experts_noisy_block_per_layer"][0]
  assert rows[-1]["expert_reduction"] > 1.0
  for r in rows:
    assert r["unique_experts_noisy_block"] <= r["coreset_noisy_block"] + 1e-9
  # Same seed, same noise draws: re-evaluating token routing reproduces its NELBO exactly.
  again = routing_sweep.evaluate_setting(model, params, batches, obj, settings[0], seed=1)
  assert again["nelbo"] == rows[0]["nelbo"]
  assert rows[0]["quality_pct"] == 100.0 and rows[0]["expert_reduction"] == 1.0


def test_interceptor_sees_scanned_layers(tiny_model):
  model, params, batches, obj = tiny_model
  scanned = transformer.Transformer(dataclasses.replace(model.cfg, scan_layers=True))
  tokens = jnp.zeros((1, 8), jnp.int32)
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  sparams = nn.unbox(scanned.init(jax.random.key(0), tokens, meta)["params"])
  setting = routing_sweep.RoutingSetting("block", 0.5, K)
  r = routing_sweep.evaluate_setting(scanned, sparams, batches, obj, setting)
  assert len(r["unique_experts_noisy_block_per_layer"]) == model.cfg.num_layers
  assert K <= r["unique_experts_noisy_block"] <= E
