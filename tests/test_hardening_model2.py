"""Upcycling with LoRA adapters, config-field error names, FLOP and KV-byte counts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import flops
from blockdiff_jax.model import kv_memory
from blockdiff_jax.model import lora
from blockdiff_jax.model import moe
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import kv_cache


def _tiny(lora_cfg=None, scan=False, **kw):
  return transformer.TransformerConfig(vocab_size=16, d_model=12, num_layers=2, num_heads=2,
                                       num_kv_heads=1, head_dim=4, mlp_dim=6, lora=lora_cfg,
                                       scan_layers=scan, **kw)


def _random_params(cfg):
  """Seeded random values in the model's parameter tree (no init pass); LoRA B too, so
  the adapters are not the no-op they start as."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                      flops.param_shapes(cfg))


def test_upcycling_keeps_trained_plain_mlp_adapters():
  """Plain adapters on the MLP are folded into the experts, attention adapters stay:
  the upcycled model computes the adapted dense model's logits (rank 20 > every dim)."""
  lcfg = lora.LoraConfig(rank=20, alpha=3.0, targets=("q", "gate", "down"), gated=False)
  cfg = _tiny(lcfg, scan=True)
  dense = transformer.Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)), jnp.int32)
  meta = masks.make_meta(jnp.broadcast_to(jnp.arange(8), (2, 8)), 1, masks.CLEAN)
  params = _random_params(cfg)
  up_params, up_cfg = upcycle.upcycle(params, cfg, num_experts=4, top_k=2, seed=1)
  assert up_cfg.lora.targets == ("q",)
  # Every expert's gate kernel is W + (alpha / r) A B, per stacked layer (numpy).
  gate = params["stack_0"]["mlp"]["gate"]
  want_kernel = np.asarray(gate["DenseGeneral_0"]["kernel"]) + 3.0 / 20 * np.einsum(
      "lir,lro->lio", np.asarray(gate["lora_a"]), np.asarray(gate["lora_b"]))
  assert np.abs(want_kernel - np.asarray(gate["DenseGeneral_0"]["kernel"])).max() > 0.1
  for e in range(4):
    np.testing.assert_allclose(np.asarray(up_params["stack_0"]["moe"]["wi_gate"][:, e]),
                               want_kernel, atol=1e-5, rtol=1e-5)
  want = jax.jit(dense.apply)({"params": params}, tokens, meta)[0]
  got, aux = jax.jit(transformer.Transformer(up_cfg).apply)({"params": up_params}, tokens, meta)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  assert np.asarray(aux["moe"]["unique_experts"]).min() > 2


def test_upcycling_refuses_adapters_it_cannot_fold():
  cfg = _tiny(lora.LoraConfig(rank=2, targets=("up",), gated=True, mask_id=15))
  params = flops.param_shapes(cfg)
  with pytest.raises(ValueError, match="gated LoRA adapters on the MLP"):
    upcycle.upcycle(params, cfg, 4, 2)
  # The params-only entry point has no scale to fold with: it must not drop them silently.
  with pytest.raises(ValueError, match="'layer_0' holds LoRA adapters"):
    upcycle.upcycle_params(params, 4)


def _moe_section(**fields):
  m = model_config.default_model_config()
  m.moe.num_experts, m.moe.top_k = 4, 2
  for name, value in fields.items():
    section, field = name.split(".")
    m[section][field] = value
  return m


@pytest.mark.parametrize("fields,message", [
    ({"moe.router_mode": "block", "moe.block_coverage": 1.5}, "model.moe.block_coverage "),
    ({"moe.router_mode": "block", "moe.block_min_experts": 1}, "model.moe.block_min_experts=1 "),
    ({"moe.top_k": 5}, "model.moe.top_k=5 "),
    ({"moe.impl": "bogus"}, "model.moe.impl "),
    ({"rope_scaling.type": "linear", "rope_scaling.factor": 0.5}, "model.rope_scaling.factor "),
    ({"rope_scaling.type": "bogus"}, "model.rope_scaling.type "),
])
def test_config_errors_name_the_field_as_the_user_types_it(fields, message):
  """Errors raised by the dataclasses built from ``config.model`` name the full field."""
  m = _moe_section(**fields)
  with pytest.raises(ValueError) as e:
    transformer.TransformerConfig.from_config(m, vocab_size=16)
  assert str(e.value).startswith(message), str(e.value)


def test_llama3_ramp_error_names_the_section():
  with pytest.raises(ValueError, match=r"^model\.rope_scaling needs"):
    rope.RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=4.0)


def _hand_forward_flops(cfg, kv_length):
  """2 FLOPs per multiply-add of every matmul one token runs, written out by hand."""
  d, h, hkv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attention = d * h * dh + 2 * d * hkv * dh + h * dh * d
  dense_mlp = 3 * d * cfg.mlp_dim
  total = 0
  for i in range(cfg.num_layers):
    total += attention
    if cfg.is_moe_layer(i):
      e = cfg.moe
      total += d * e.num_experts + e.top_k * 3 * d * e.expert_dim
      total += 3 * d * e.shared_expert_dim + (d if e.shared_expert_gate else 0)
    else:
      total += dense_mlp
  total += cfg.vocab_size * d  # The LM head, tied or not.
  scores = 2 * kv_length * h * dh * cfg.num_layers  # QK^T and PV.
  return 2.0 * (total + scores)


@pytest.mark.parametrize("kw", [
    dict(qkv_bias=True, qk_norm=True),
    dict(tie_embeddings=True, moe=moe.MoEConfig(num_experts=4, top_k=3, expert_dim=10,
                                                shared_expert_dim=5, shared_expert_gate=True),
         first_dense_layers=1),
])
def test_forward_flops_match_a_hand_count(kw):
  """GQA attention, top-k experts, a shared expert and the head: matmuls only (norm
  scales and biases are elementwise, not 2 FLOPs per parameter)."""
  cfg = transformer.TransformerConfig(vocab_size=50, d_model=16, num_layers=3, num_heads=4,
                                      num_kv_heads=2, head_dim=6, mlp_dim=24, **kw)
  assert flops.forward_flops_per_token(cfg, 7) == _hand_forward_flops(cfg, 7)
  assert flops.forward_flops_per_token(cfg, 7, with_head=False) == (
      _hand_forward_flops(cfg, 7) - 2.0 * 50 * 16)


def test_cache_bytes_follow_the_arrays_at_the_edges():
  """kv_memory's arithmetic equals the arrays the caches allocate: a chunk that does not
  divide the capacity, rank 1 and rank = chunk, no / several sinks, the summary form and a
  ring wider than the context."""
  spec = kv_cache.KVSpec(num_layers=2, num_kv_heads=3, head_dim=4, dtype=jnp.bfloat16)
  cases = itertools.product([37, 64], [(1, 5), (2, 8), (4, 16)], [0, 3], ["rank", "summary"],
                            [0, 7])
  for capacity, (window, chunk), sinks, form, buffer in cases:
    for rank in (1, chunk):
      hy = hc.Hierarchy(window=window, chunk=chunk, rank=rank, sinks=sinks, form=form)
      got = hc.cache_bytes(spec, 2, capacity, hy, buffer_size=buffer)
      want = kv_memory.hierarchical_cache_bytes(2, 3, 4, jnp.bfloat16, 2, capacity, window,
                                                chunk, rank, sinks, buffer, form)
      assert got == want, (capacity, window, chunk, rank, sinks, form, buffer)
