"""Edge cases of the model, masks and objectives, each against an independent reference."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.model import build
from blockdiff_jax.model import lora
from blockdiff_jax.model import moe
from blockdiff_jax.model import summary
from blockdiff_jax.model import transformer
import test_moe

MASK = 15


def _silu(z):
  return z / (1.0 + np.exp(-z))


# --- MoE: token routing does not depend on the block-routing options. ---


@pytest.mark.parametrize("e,k", [(1, 1), (4, 4), (4, 3)])
def test_token_routing_accepts_any_top_k_and_matches_a_loop(e, k):
  # Defaults keep block_min_experts=2, which only block routing reads.
  cfg = moe.MoEConfig(num_experts=e, top_k=k, expert_dim=6, impl="ragged_dot")
  layer = moe.MoEFeedForward(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 5, 4))
  meta = masks.make_meta(jnp.arange(5)[None], 5, masks.CLEAN)
  params = layer.init(jax.random.key(1), x, meta)
  y, _ = jax.jit(layer.apply)(params, x, meta)
  p = {n: np.asarray(v.unbox() if hasattr(v, "unbox") else v)
       for n, v in params["params"].items()}
  xs = np.asarray(x[0], np.float64)
  logits = xs @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.zeros_like(xs)
  for i in range(xs.shape[0]):
    top = np.argsort(-probs[i], kind="stable")[:k]
    w = probs[i, top] / probs[i, top].sum()
    for ex, wi in zip(top, w):
      h = _silu(xs[i] @ p["wi_gate"][ex]) * (xs[i] @ p["wi_up"][ex])
      want[i] += wi * (h @ p["wo"][ex])
  np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-4, atol=1e-5)


def test_token_routed_config_with_top_k_3_validates():
  c = config_lib.base_config()
  c.model.moe.top_k = 3  # block_min_experts stays at its default of 2
  config_lib.validate(c)


def test_block_routing_still_checks_its_options():
  with pytest.raises(ValueError, match="block_min_experts=1"):
    moe.MoEConfig(num_experts=4, top_k=2, router_mode="block", block_min_experts=1)
  with pytest.raises(ValueError, match="block_coverage"):
    moe.MoEConfig(num_experts=4, top_k=2, router_mode="block", block_coverage=0.0)


def test_block_coreset_keeps_far_apart_blocks_separate():
  # Anchored I-DLM blocks: 3 noisy blocks of 2 at positions 0, 50 and 100 (T = 6),
  # then 2 clean tokens whose block ids are their positions.
  pos = jnp.asarray([[0, 1, 50, 51, 100, 101, 3, 4]], jnp.int32)
  bid = jnp.asarray([[0, 0, 50, 50, 100, 100, 3, 4]], jnp.int32)
  stream = jnp.asarray([[0, 0, 0, 0, 0, 0, 1, 1]], jnp.int32)
  meta = masks.TokenMeta(pos, bid, stream, jnp.zeros_like(pos), jnp.zeros(pos.shape, bool))
  groups = np.asarray(moe.block_group_ids(meta))[0]
  assert len(set(groups.tolist())) == 5
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (1, 8, 8)) * 3)
  got = moe.block_coreset(probs, meta, 2, 0.5, 2)
  want = test_moe.reference_coreset(np.asarray(probs), np.asarray(bid), np.asarray(stream),
                                    2, 0.5, 2)
  np.testing.assert_array_equal(np.asarray(got), want)


# --- Plain LoRA on summary slots. ---


def _summary_cfg(lcfg):
  return transformer.TransformerConfig(
      vocab_size=16, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
      mlp_dim=24, lora=lcfg,
      summary=summary.SummaryConfig(num_slots=2, window_blocks=1, block_size=2))


def _nonzero_adapters(params):
  # B starts at zero; shift it so the adapters change the function.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(path) else x, params)


def _summary_lora_logits(lcfg, reference_params):
  """(logits of a summary model with non-zero adapters, logits of the adapter-free model
  on ``reference_params(params)``), on MASK-free tokens."""
  cfg = _summary_cfg(lcfg)
  tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 15)  # no MASK token
  meta = masks.training_meta(8, 2, 1)
  model = transformer.Transformer(cfg)
  params = _nonzero_adapters(
      nn.unbox(model.init(jax.random.key(1), tokens, meta, summary="bd3")["params"]))
  run = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, tokens, meta, summary="bd3"))(p)
  got, _ = run(model, params)
  want, _ = run(transformer.Transformer(dataclasses.replace(cfg, lora=None)),
                reference_params(params))
  return got, want


def test_plain_lora_on_summary_slots_equals_merged_weights():
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, gated=False)
  got, want = _summary_lora_logits(lcfg, lambda p: lora.merge_adapters(p, lcfg))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gated_lora_stays_shut_on_summary_slots():
  got, want = _summary_lora_logits(lora.LoraConfig(rank=2, alpha=4.0, gated=True, mask_id=MASK),
                                   _strip_adapters)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _strip_adapters(node):
  if not isinstance(node, dict):
    return node
  return {k: _strip_adapters(v) for k, v in node.items() if k not in ("lora_a", "lora_b")}


# --- Config combinations that were accepted and then ignored or mislaid. ---


def test_ar_objective_with_summary_slots_is_rejected():
  c = config_lib.base_config()
  c.model.summary.num_slots = 1
  c.diffusion.objective = "ar"
  c.diffusion.token_shift = True
  with pytest.raises(ValueError, match="diffusion.objective='ar'"):
    config_lib.validate(c)


def test_upcycle_without_a_pretrained_checkpoint_is_rejected():
  c = config_lib.base_config()
  c.model.moe.upcycle_from_dense = True
  with pytest.raises(ValueError, match="upcycle_from_dense=True needs init.pretrained"):
    config_lib.validate(c)


def test_lora_targets_only_on_expert_layers_are_rejected():
  c = config_lib.base_config()
  c.model.lora.rank = 2
  c.model.lora.gated = False
  c.model.lora.targets = ("gate", "up", "down")
  with pytest.raises(ValueError, match=r"model.lora.targets=\('gate', 'up', 'down'\)"):
    config_lib.validate(c)
  c.model.moe.first_dense_layers = 1  # a dense layer carries the adapters
  config_lib.validate(c)


def test_isd_anchors_past_the_sequence_are_rejected():
  c = config_lib.base_config()
  c.diffusion.objective = "introspective"
  c.diffusion.token_shift = True
  c.diffusion.isd_anchors = c.data.seq_len
  with pytest.raises(ValueError, match=f"diffusion.isd_anchors={c.data.seq_len}"):
    config_lib.validate(c)


# --- A literal MASK id at a position that is never scored. ---


@pytest.fixture(scope="module")
def tiny_apply():
  cfg = transformer.TransformerConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=16)
  model = transformer.Transformer(cfg)
  return build.make_apply(model), build.init_params(model, 0)


def _mask_in_prompt_batch():
  tokens = jnp.asarray([[1, 2, MASK, 4, 5, 6, 7, 8]], jnp.int32)
  loss_mask = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1]], jnp.float32)
  return {"tokens": tokens, "loss_mask": loss_mask}


def test_bd3_loss_ignores_a_mask_token_in_the_prompt(tiny_apply):
  apply, params = tiny_apply
  batch = _mask_in_prompt_batch()
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=MASK)
  rng = jax.random.key(0)
  loss, m = jax.jit(lambda p: losses.block_diffusion_loss(apply, p, batch, rng, obj))(params)
  terms = losses.per_token_nelbo(apply, params, batch, rng, obj)
  nll, w = np.asarray(terms.nll), np.asarray(terms.weight)
  assert np.isinf(nll[0, 2])  # the MASK token itself: never predicted
  sel = np.asarray(terms.is_masked)
  want = np.sum(nll[sel] * w[sel]) / 4.0
  np.testing.assert_allclose(float(m["nelbo"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)  # dense model: no aux loss


@pytest.mark.parametrize("name", ["fastdllm", "ar", "introspective"])
def test_shifted_losses_ignore_a_mask_token_in_the_prompt(tiny_apply, name):
  apply, params = tiny_apply
  batch = _mask_in_prompt_batch()
  rng = jax.random.key(0)
  if name == "fastdllm":
    obj = fastdllm.FastDLLMObjective(block_size=4, mask_id=MASK)
    fn = fastdllm.fastdllm_loss
    nll, sel, _, _ = fastdllm.per_token_terms(apply, params, batch, rng, obj)
  elif name == "ar":
    obj = autoregressive.AutoregressiveObjective(mask_id=MASK)
    fn = autoregressive.autoregressive_loss
    nll, sel, _, _ = autoregressive.per_token_terms(apply, params, batch, obj)
  else:
    obj = introspective.IntrospectiveObjective(stride=2, mask_id=MASK, clean_weight=0.5)
    fn = introspective.introspective_loss
    t = introspective.per_token_ce(apply, params, batch, obj)
    nll, sel = t["noisy_nll"], t["noisy_weight"] > 0
  loss, m = jax.jit(lambda p: fn(apply, p, batch, rng, obj))(params)
  nll, sel = np.asarray(nll), np.asarray(sel)
  want = nll[sel].mean()
  if name == "introspective":
    want += 0.5 * np.asarray(t["clean_nll"])[np.asarray(t["weight"]) > 0].mean()
  assert np.isfinite(want)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
