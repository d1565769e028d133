"""Hardening of model/ and configs/: parameter and FLOP counts, and fields refused up front.

* Every shipped config's parameter count, from its fields by hand, against the built
  model's (``flops.param_counts``) and ``--mode=plan``'s.
* Fast-dLLM v2 steps of a summary-token model count the slots (against XLA's count).
* ``long_context_extension`` refuses a pretrained base (its RoPE would replace YaRN).
* Non-finite RoPE-scaling and LoRA fields, and a head_dim RoPE cannot rotate, are refused
  by ``validate`` naming the field.
"""

import glob
import math
import os

import jax
import jax.numpy as jnp
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import flops
from blockdiff_jax.model import summary as summary_lib
from blockdiff_jax.model import transformer
from blockdiff_jax.train import plan as plan_lib
from conftest import ROOT, load_config_file, load_repo_module

CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _hand_count(m, vocab: int) -> int:
  """Parameters of ``config.model`` ``m`` from its fields alone (no model code)."""
  d, h, hk, dh, e = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.moe
  lora = m.lora
  # A rank-r adapter on an [in, out] projection adds r * (in + out).
  adapter = lambda name, n_in, n_out: lora.rank * (n_in + n_out) if (
      lora.rank and name in lora.targets) else 0
  attn = d * h * dh + 2 * d * hk * dh + h * dh * d
  attn += (h * dh + 2 * hk * dh) if m.qkv_bias else 0
  attn += 2 * dh if m.qk_norm else 0
  attn += (adapter("q", d, h * dh) + adapter("k", d, hk * dh) + adapter("v", d, hk * dh)
           + adapter("o", h * dh, d))
  total = vocab * d * (1 if m.tie_embeddings else 2) + d  # + the final norm.
  total += m.summary.num_slots * d
  for i in range(m.num_layers):
    moe = (e.num_experts and i >= e.first_dense_layers
           and (i - e.first_dense_layers) % e.moe_every == 0)
    if moe:  # Router, E experts, an optional (gated) shared expert; no adapters.
      mlp = d * e.num_experts + 3 * e.num_experts * d * e.expert_dim
      mlp += 3 * d * e.shared_expert_dim + (d if e.shared_expert_gate else 0)
    else:
      f = m.mlp_dim
      mlp = 3 * d * f + adapter("gate", d, f) + adapter("up", d, f) + adapter("down", f, d)
    total += attn + mlp + 2 * d  # + the two norms.
  return total


def _config(name):
  c = load_config_file(name)
  c.model.vocab_size = c.model.vocab_size or 256  # The byte tokenizer's.
  return c


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_counts_its_parameters_alike(name):
  """Hand count = the built model's (``flops.param_counts``: ``jax.eval_shape`` of its init)."""
  c = _config(name)
  model_config.validate(c)
  want = _hand_count(c.model, c.model.vocab_size)
  cfg = model_config.model_config(c)
  counts = flops.param_counts(cfg)
  assert counts["total"] == want
  # Active = everything but the routed experts a token does not use.
  e = c.model.moe
  idle = (cfg.num_moe_layers * (e.num_experts - e.top_k) * 3 * c.model.d_model
          * e.expert_dim if e.num_experts else 0)
  assert counts["active"] == want - idle


@pytest.mark.parametrize("name", ["tiny", "chatdlm_7b", "smollm2_idlm", "qwen3_8b"])
def test_plan_reports_the_hand_count(name):
  """``--mode=plan``'s count, from the abstract params it shards."""
  c = _config(name)
  assert plan_lib.plan(c)["params"] == _hand_count(c.model, c.model.vocab_size)


def _xla_forward_flops(cfg, seq_len):
  """XLA's count of one ``[x_t ; x_0]`` forward with the clean stream's summary slots."""
  model = transformer.Transformer(cfg)
  tokens = jnp.zeros((1, 2 * seq_len), jnp.int32)
  pos = jnp.arange(seq_len)[None]
  block = cfg.summary.block_size
  meta = masks.make_meta(pos, block, masks.NOISY).concat(masks.make_meta(pos, block,
                                                                          masks.CLEAN))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, meta))["params"]
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, meta, summary="bd3")[0])
  cost = fwd.lower(params, tokens).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("impl", ["xla", "structured"])
def test_fastdllm_step_flops_count_the_summary_slots(impl):
  """Fast-dLLM v2 runs the BD3 layout through ``make_apply``, slots included: its count
  follows XLA's on an attention-heavy shape (ours leaves out element-wise work, so it
  sits a little below; it was 0.74x on the dense path and 1.45x on the structured one)."""
  seq_len = 256
  cfg = transformer.TransformerConfig(
      vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
      mlp_dim=256, attention_impl=impl, summary=summary_lib.SummaryConfig(4, 1, 16))
  ours = flops.fastdllm_step_flops(cfg, 1, seq_len, complementary=False,
                                   frozen_base=False) / 3  # Forward only.
  ratio = ours / _xla_forward_flops(cfg, seq_len)
  assert 0.85 < ratio < 1.02, ratio
  # Complementary masks double the rows; a frozen base forms no weight gradients: one
  # per forward matmul of the weights (by hand: q, k, v 64 x 12 x 16, out 64 x 64,
  # SwiGLU 3 x 64 x 256, two layers; the head 64 x 64 on the 2L token positions; nor
  # the first layer's input gradient, the embedding being frozen).
  positions = flops._two_stream_pass(cfg, seq_len)[0]  # pylint: disable=protected-access
  weight_grads = 2 * 2.0 * (positions * 2 * (64 * 12 * 16 + 64 * 64 + 3 * 64 * 256)
                            + 2 * seq_len * 64 * 64
                            + positions * 64 * 12 * 16)  # Layer 0's q, k, v input gradient.
  assert flops.fastdllm_step_flops(cfg, 1, seq_len, True, True) == pytest.approx(
      6 * ours - weight_grads)


def _extension():
  return load_repo_module("configs", "long_context_extension")


@pytest.mark.parametrize("base", ["smollm2", "smollm2_fastdllm", "smollm2_idlm"])
def test_extension_refuses_a_pretrained_base(base):
  """Building it would replace the YaRN scaling by the checkpoint's unscaled RoPE."""
  with pytest.raises(ValueError, match=f"base config '{base}' sets init.pretrained"):
    _extension().get_config(f"{base},4")


def test_extension_validate_refuses_init_pretrained_but_keeps_scratch_bases():
  mod = _extension()
  c = mod.get_config("tiny,4")
  c.init_from.workdir = "/runs/source"
  mod.validate(c)  # A base trained from scratch extends as before.
  assert c.model.rope_scaling.type == "yarn" and c.model.rope_scaling.factor == 4.0
  c.init.pretrained = "smollm2"
  with pytest.raises(ValueError, match="init.pretrained='smollm2'"):
    mod.validate(c)


@pytest.mark.parametrize("kind, field, value", [
    ("linear", "factor", math.nan), ("linear", "factor", math.inf),
    ("yarn", "factor", math.inf), ("yarn", "attention_factor", math.nan),
    ("yarn", "attention_factor", math.inf), ("yarn", "beta_fast", math.inf),
    ("yarn", "mscale", math.nan), ("yarn", "mscale_all_dim", math.inf), ("llama3", "high_freq_factor", math.inf),
])
def test_non_finite_rope_scaling_is_refused_naming_the_field(kind, field, value):
  c = _config("tiny")
  c.model.rope_scaling.type = kind
  if field.startswith("mscale"):  # Read only when both are set.
    c.model.rope_scaling.mscale = c.model.rope_scaling.mscale_all_dim = 1.0
  c.model.rope_scaling[field] = value
  with pytest.raises(ValueError, match=f"model.rope_scaling.{field} must be finite"):
    model_config.validate(c)


def test_finite_rope_scaling_still_validates():
  c = _config("tiny")
  c.model.rope_scaling.type = "yarn"
  c.model.rope_scaling.factor = 4.0
  c.model.rope_scaling.mscale = 1.0
  c.model.rope_scaling.mscale_all_dim = 1.0
  model_config.validate(c)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, 0.0])
def test_lora_alpha_must_be_finite_and_nonzero(alpha):
  """Adapter B starts at zero, but 0 * NaN is NaN: the first forward's logits were NaN."""
  c = _config("tiny")
  c.model.lora.rank, c.model.lora.gated, c.model.lora.targets = 4, False, ("q", "v")
  c.model.lora.alpha = alpha
  with pytest.raises(ValueError, match="model.lora.alpha must be finite and nonzero"):
    model_config.validate(c)
  c.model.lora.alpha = -8.0  # A negative scale is still a scale.
  model_config.validate(c)


def test_head_dim_rope_cannot_rotate_is_refused_at_validate():
  """head_dim=2 passed validate and failed in the first forward without naming it."""
  c = _config("tiny")
  c.model.head_dim = 2
  with pytest.raises(ValueError, match="model.head_dim must be even and >= 4"):
    model_config.validate(c)
  c.model.head_dim = 4
  model_config.validate(c)


@pytest.mark.parametrize("own,theirs,want", [
    ("yarn", "none", "yarn"),  # A context extension of an unscaled checkpoint: kept.
    ("none", "llama3", "llama3"),  # The checkpoint's own scaling.
    ("llama3", "llama3", "llama3"),  # A saved config.json read back: the checkpoint's.
    ("yarn", "yarn", None),  # The same type with another factor (2 against 8): refused.
    ("yarn", "llama3", None),  # Two scalings: refused.
])
def test_pretrained_resolution_keeps_a_configs_rope_scaling_over_an_unscaled_checkpoint(
    monkeypatch, own, theirs, want):
  from blockdiff_jax import config as config_lib
  from blockdiff_jax.checkpoint import initial
  c = config_lib.base_config()
  c.init.pretrained = "some-checkpoint"
  c.model.rope_scaling.type, c.model.rope_scaling.factor = own, 2.0
  overrides = {"rope_theta": 12345.0, "rope_scaling.type": theirs, "_mask_id": 3}
  if theirs != "none":
    overrides.update({"rope_scaling.factor": 8.0,
                      "rope_scaling.original_max_position": 8192})
  monkeypatch.setattr(initial.pretrained, "describe", lambda spec, workdir: (overrides, None))
  if own == theirs:  # As written into config.json by an earlier resolve.
    c.model.rope_scaling.factor, c.model.rope_scaling.original_max_position = 8.0, 8192
  if want is None:
    message = (r"model.rope_scaling.factor=2.0 \(checkpoint: 8.0\)" if own == theirs else
               r"model.rope_scaling.type='yarn' but pretrained='some-checkpoint' already")
    if own == theirs:
      c.model.rope_scaling.factor = 2.0
    with pytest.raises(ValueError, match=message):
      initial.resolve_config(c, None)
    return
  resolved, _ = initial.resolve_config(c, None)
  rs = resolved.model.rope_scaling
  assert resolved.model.rope_theta == 12345.0  # The rest of the checkpoint still wins.
  assert rs.type == want
  assert rs.factor == (2.0 if own == "yarn" else 8.0)
