"""FLOP counts, attention-cost shapes, routing sweeps and LoRA config validation."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.evaluation import attention_cost
from blockdiff_jax.evaluation import routing_sweep
from blockdiff_jax.model import flops
from blockdiff_jax.model import lora
from blockdiff_jax.model import moe as moe_lib
from blockdiff_jax.model import summary
from blockdiff_jax.model import transformer

E, K = 4, 2


def _cfg(**kw):
  args = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=4, mlp_dim=24)
  args.update(kw)
  return transformer.TransformerConfig(**args)


def _hand_params(c):
  """(total, active matmul incl. head) parameters of ``_cfg`` models, by hand."""
  d, h, kv, hd, v = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
  total, active = v * d * (1 if c.tie_embeddings else 2) + d, v * d
  ins = {"q": d, "k": d, "v": d, "o": h * hd, "gate": d, "up": d, "down": c.mlp_dim}
  outs = {"q": h * hd, "k": kv * hd, "v": kv * hd, "o": d, "gate": c.mlp_dim,
          "up": c.mlp_dim, "down": d}
  for i in range(c.num_layers):
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    norms = 2 * d + (h * hd + 2 * kv * hd if c.qkv_bias else 0) + (2 * hd if c.qk_norm else 0)
    if c.is_moe_layer(i):
      m = c.moe
      ffn_total = d * m.num_experts + 3 * m.num_experts * d * m.expert_dim
      ffn_active = d * m.num_experts + 3 * m.top_k * d * m.expert_dim
      shared = 3 * d * m.shared_expert_dim + (d if m.shared_expert_gate else 0)
      ffn_total, ffn_active = ffn_total + shared, ffn_active + shared
      names = ("q", "k", "v", "o")
    else:
      ffn_total = ffn_active = 3 * d * c.mlp_dim
      names = lora.TARGETS
    if c.lora is not None:
      adapters = sum(c.lora.rank * (ins[t] + outs[t]) for t in names if c.lora.has(t))
      attn += adapters  # Counted with attention here; only the sum matters.
    total += attn + norms + ffn_total
    active += attn + ffn_active
  if c.summary is not None:
    total += c.summary.num_slots * d
  return total, active


_CONFIGS = {
    "gqa_untied": dict(tie_embeddings=False, qkv_bias=True, qk_norm=True),
    "moe_shared": dict(num_layers=3, first_dense_layers=1, moe=moe_lib.MoEConfig(
        num_experts=E, top_k=K, expert_dim=8, shared_expert_dim=6, shared_expert_gate=True)),
    "moe_scan": dict(num_layers=4, scan_layers=True, moe_every=2, moe=moe_lib.MoEConfig(
        num_experts=E, top_k=3, expert_dim=8, block_min_experts=3)),
    "lora": dict(lora=lora.LoraConfig(rank=3, targets=("q", "v", "down"), gated=False)),
    "summary": dict(summary=summary.SummaryConfig(2, 1, 4)),
}


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_param_and_flop_counts_match_a_hand_count(name):
  """Already right; pins param_counts / forward_flops_per_token to an independent count."""
  c = _cfg(**_CONFIGS[name])
  total, active = _hand_params(c)
  assert flops.param_counts(c)["total"] == total
  attn = 2 * 2 * 10 * c.num_heads * c.head_dim * c.num_layers
  assert flops.forward_flops_per_token(c, 10) == 2.0 * active + attn


def test_structured_step_counts_the_logits_the_structured_path_computes():
  """Slot queries score their block and sibling slots (B + S keys), not the window+bank."""
  w, s, b, length = 1, 2, 4, 32
  common = dict(summary=summary.SummaryConfig(s, w, b))
  dense = _cfg(**common)
  structured = _cfg(attention_impl="structured", **common)
  nb = length // b
  bank = nb * s
  # summary_attention.structured_attention: 2L token queries x [own block | W blocks |
  # bank], nb*S slot queries x [clean block | sibling slots].
  logits = 2 * length * ((w + 1) * b + bank) + bank * (b + s)
  dense_logits = (2 * length + bank) ** 2
  per_logit = 3 * 2 * 2 * dense.num_heads * dense.head_dim * dense.num_layers  # fwd + bwd
  got = flops.train_step_flops(structured, 1, length) - flops.train_step_flops(dense, 1, length)
  assert got == pytest.approx(per_logit * (logits - dense_logits))


@pytest.mark.parametrize("field,value", [
    ("heads", 0), ("kv_heads", 0), ("head_dim", 0), ("slots", 0), ("window", 0),
    ("heads", 2.0), ("kv_heads", 3)])
def test_attention_shape_rejects_a_bad_field_by_name(field, value):
  with pytest.raises(ValueError, match=field):
    attention_cost.AttentionShape(**{"heads": 2, "kv_heads": 1, field: value})


def _moe_model():
  return transformer.Transformer(_cfg(num_layers=1, moe=moe_lib.MoEConfig(
      num_experts=E, top_k=K, expert_dim=8, impl="dense", block_min_experts=K)))


@pytest.mark.parametrize("bad", [
    routing_sweep.RoutingSetting("block", 0.5, 0),  # the default minimum: below top_k
    routing_sweep.RoutingSetting("block", 0.5, E + 1),
    routing_sweep.RoutingSetting("block", 0.5, 2.5)])
def test_sweep_checks_every_setting_before_the_baseline_runs(monkeypatch, bad):
  calls = []
  monkeypatch.setattr(routing_sweep, "evaluate_setting",
                      lambda *a, **kw: calls.append(a[4]) or {})
  with pytest.raises(ValueError, match="block_min_experts"):
    routing_sweep.sweep(_moe_model(), {}, [{}], None, [routing_sweep.RoutingSetting("token"),
                                                       bad])
  assert not calls  # Not after the token baseline (and earlier settings) ran.


@pytest.mark.parametrize("coverages,mins", [([], [2]), ([0.5], [])])
def test_settings_grid_refuses_an_empty_axis(coverages, mins):
  with pytest.raises(ValueError, match="empty"):
    routing_sweep.settings_grid(E, K, coverages, mins)


@pytest.mark.parametrize("mode", ["token", "block"])
def test_block_stats_accept_one_metadata_row_for_the_batch(mode):
  """The model takes one meta row for a batch (MoEFeedForward broadcasts it); the
  sweep's counts must too, and equal those of the broadcast metadata."""
  model = transformer.Transformer(routing_sweep.with_routing(
      _moe_model().cfg, routing_sweep.RoutingSetting(mode, 0.6, K)))
  length, rows = 8, 3
  meta = masks.training_meta(length, 4, 1)
  tokens = jax.random.randint(jax.random.key(1), (rows, 2 * length), 0, 32)
  params = nn.unbox(model.init(jax.random.key(0), tokens, meta.broadcast_to(tokens.shape)))
  fn = routing_sweep.make_apply_with_block_stats(model)
  _, aux = fn(params["params"], tokens, meta)
  _, want = fn(params["params"], tokens, meta.broadcast_to(tokens.shape))
  for key in routing_sweep.BLOCK_STAT_KEYS:
    np.testing.assert_array_equal(np.asarray(aux["moe"][key]), np.asarray(want["moe"][key]))
  assert float(np.sum(want["moe"]["noisy_groups"])) == rows * 2  # 2 blocks per row


@pytest.mark.parametrize("kw,match", [
    (dict(targets="up"), "targets.*string"),
    (dict(targets="qv"), "targets.*string"),
    (dict(alpha=None), "alpha"),
    (dict(alpha="16"), "alpha"),
    (dict(alpha=True), "alpha"),
    (dict(gated=True, mask_id=2.5), "mask_id"),
    (dict(gated=True, mask_id=None), "mask_id")])
def test_lora_config_names_the_bad_field(kw, match):
  kw = {"gated": False, **kw}
  with pytest.raises(ValueError, match=match):
    lora.LoraConfig(**kw)


def test_lora_scale_is_alpha_over_rank():
  c = lora.LoraConfig(rank=4, alpha=6, targets=("q",), gated=True, mask_id=np.int64(3))
  assert c.scale == 1.5 and c.has("q") and not c.has("k")
