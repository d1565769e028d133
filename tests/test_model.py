"""Transformer: parameter counts of the named configs, KV cache, scan, RoPE, validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import flops
from blockdiff_jax.model import moe
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from conftest import load_config_file


def hf_style_count(vocab, d, layers, heads, kv, hd, mlp, qkv_bias, qk_norm, tied, experts=0,
                   expert_dim=0):
  """Parameter count written out by hand, the way HF model cards count it."""
  attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d
  if qkv_bias:
    attn += heads * hd + 2 * kv * hd
  if qk_norm:
    attn += 2 * hd
  ffn = experts * (3 * d * expert_dim) + d * experts if experts else 3 * d * mlp
  per_layer = attn + ffn + 2 * d
  return vocab * d * (1 if tied else 2) + layers * per_layer + d


@pytest.mark.parametrize("name,published", [
    ("qwen2_5_1_5b", 1_543_714_304),  # Qwen2.5-1.5B model card / safetensors index.
    ("qwen3_8b", 8_190_735_360),  # Qwen3-8B safetensors index.
    ("chatdlm_7b", None),  # Our own 7B-class MoE: checked against the formula and "~7B".
])
def test_full_size_parameter_counts(name, published):
  c = load_config_file(name)
  config_lib.validate(c)
  cfg = config_lib.model_config(c)
  counts = flops.param_counts(cfg)  # Through jax.eval_shape: nothing is allocated.
  m = c.model
  want = hf_style_count(m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads,
                        m.head_dim, m.mlp_dim, m.qkv_bias, m.qk_norm, m.tie_embeddings,
                        m.moe.num_experts, m.moe.expert_dim)
  assert counts["total"] == want
  if published is not None:
    assert counts["total"] == published
  else:
    assert 6.5e9 < counts["total"] < 7.5e9
    assert m.moe.num_experts in range(32, 65) and m.moe.top_k == 2
    assert counts["active"] < 0.2 * counts["total"]


def _cfg(**kw):
  base = dict(vocab_size=16, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, moe=moe.MoEConfig(num_experts=4, expert_dim=16), first_dense_layers=1)
  base.update(kw)
  return transformer.TransformerConfig(**base)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("block_size", [1, 4])
def test_kv_cache_equals_full_forward(scan, block_size):
  """Noisy block attending to cached clean K/V = the same block in one full pass."""
  cfg = _cfg(scan_layers=scan)
  model = transformer.Transformer(cfg)
  prefix_len, b = 8, 2
  tokens = jax.random.randint(jax.random.key(0), (b, prefix_len), 0, 15)
  noisy = jnp.full((b, block_size), 15)
  pos_prefix = jnp.broadcast_to(jnp.arange(prefix_len), (b, prefix_len))
  pos_block = jnp.broadcast_to(prefix_len + jnp.arange(block_size), (b, block_size))
  clean_meta = masks.make_meta(pos_prefix, block_size, masks.CLEAN)
  noisy_meta = masks.make_meta(pos_block, block_size, masks.NOISY)
  params = jax.jit(model.init)(jax.random.key(1), tokens, clean_meta)
  apply = jax.jit(model.apply, static_argnames="return_kv")  # One compile, not op by op.
  full, _ = apply(params, jnp.concatenate([tokens, noisy], 1), clean_meta.concat(noisy_meta))
  _, aux = apply(params, tokens, clean_meta, return_kv=True)
  k, v = aux["kv"]
  assert k.shape == (3, b, prefix_len, 2, 8)
  cached, _ = apply(params, noisy, noisy_meta, cache={"k": k, "v": v, "meta": clean_meta})
  np.testing.assert_allclose(cached, full[:, prefix_len:], rtol=2e-5, atol=2e-5)


def test_scan_and_unrolled_layers_agree():
  cfg = _cfg()
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 15)
  meta = masks.training_meta(4, 2, 2)
  unrolled = transformer.Transformer(cfg)
  scanned = transformer.Transformer(dataclasses.replace(cfg, scan_layers=True))
  p = nn.unbox(unrolled.init(jax.random.key(1), tokens, meta)["params"])
  stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  ps = {"embed": p["embed"], "final_norm": p["final_norm"], "stack_0": stack(p["layer_0"]),
        "stack_1": stack(p["layer_1"], p["layer_2"])}
  a, aux_a = unrolled.apply({"params": p}, tokens, meta)
  b, aux_b = scanned.apply({"params": ps}, tokens, meta)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_a["moe"]["tokens_per_expert"], aux_b["moe"]["tokens_per_expert"])
  assert aux_a["moe"]["tokens_per_expert"].shape == (2, 4)


@pytest.mark.parametrize("impl,mode", [("ragged_dot", "token"), ("ragged_dot", "block"),
                                       ("tiled", "token"), ("tiled", "block"),
                                       ("pallas", "block")])
def test_moe_impls_agree_in_the_model(impl, mode):
  ref = transformer.Transformer(_cfg(moe=moe.MoEConfig(num_experts=4, expert_dim=16,
                                                       impl="dense", router_mode=mode)))
  other = transformer.Transformer(_cfg(moe=moe.MoEConfig(num_experts=4, expert_dim=16,
                                                         impl=impl, router_mode=mode)))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 15)
  meta = masks.training_meta(8, 4, 2)
  params = ref.init(jax.random.key(1), tokens, meta)
  np.testing.assert_allclose(ref.apply(params, tokens, meta)[0],
                             other.apply(params, tokens, meta)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [4])
def test_pallas_attention_agrees_with_xla_in_the_model(block_size):
  """The interpret-mode kernel inside the whole model: logits and gradients."""
  xla = transformer.Transformer(_cfg())
  pallas = transformer.Transformer(_cfg(attention_impl="pallas"))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 15)
  meta = masks.training_meta(8, block_size, 2)
  params = nn.unbox(xla.init(jax.random.key(1), tokens, meta)["params"])
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens, meta)[0] ** 2)
  np.testing.assert_allclose(xla.apply({"params": params}, tokens, meta)[0],
                             pallas.apply({"params": params}, tokens, meta)[0],
                             rtol=1e-4, atol=1e-4)
  g1, g2 = jax.grad(loss(xla))(params), jax.grad(loss(pallas))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_logits():
  model = transformer.Transformer(_cfg(dtype="bfloat16"))
  tokens = jnp.zeros((1, 8), jnp.int32)
  meta = masks.training_meta(4, 2, 1)
  params = nn.unbox(model.init(jax.random.key(0), tokens, meta)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = model.apply({"params": params}, tokens, meta)
  assert logits.dtype == jnp.float32


def test_out_of_range_token_ids_give_nan_not_a_clamped_row():
  cfg = _cfg()
  model = transformer.Transformer(cfg)
  meta = masks.training_meta(4, 2, 1)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens, meta)["params"])
  logits, _ = model.apply({"params": params}, tokens.at[0, 3].set(cfg.vocab_size + 5), meta)
  assert bool(jnp.isnan(logits[0, 3]).all())  # A clamped lookup would give finite logits.


def test_rope_scaling_variants():
  inv, f = rope.inverse_frequencies(8, 10000.0, rope.RopeScaling())
  np.testing.assert_allclose(inv, 1 / 10000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
  assert f == 1.0
  lin, _ = rope.inverse_frequencies(8, 10000.0, rope.RopeScaling("linear", 4.0))
  np.testing.assert_allclose(lin, inv / 4, rtol=1e-6)
  ntk, _ = rope.inverse_frequencies(8, 10000.0, rope.RopeScaling("ntk", 4.0))
  np.testing.assert_allclose(ntk, 1 / (10000.0 * 4 ** (8 / 6)) ** (np.arange(0, 8, 2) / 8),
                             rtol=1e-5)
  yarn, f = rope.inverse_frequencies(128, 10000.0, rope.RopeScaling("yarn", 32.0, 4096))
  base, _ = rope.inverse_frequencies(128, 10000.0, rope.RopeScaling())
  np.testing.assert_allclose(yarn[0], base[0], rtol=1e-6)  # Fast dims keep their frequency.
  np.testing.assert_allclose(yarn[-1], base[-1] / 32, rtol=1e-5)  # Slow dims interpolate.
  np.testing.assert_allclose(f, 0.1 * np.log(32) + 1)
  # A rotation preserves norms and relative positions.
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None]
  r = rope.apply_rope(x, pos, inv)
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  dots = lambda p: jnp.einsum("d,d->", rope.apply_rope(x, p, inv)[0, 1, 0],
                              rope.apply_rope(x, p, inv)[0, 3, 0])
  np.testing.assert_allclose(dots(pos), dots(pos + 7), rtol=1e-4)


@pytest.mark.parametrize("field,value,message", [
    ("data.seq_len", 60, "data.seq_len=60 is not a multiple of diffusion.block_size=8"),
    ("model.moe.top_k", 9, "top_k=9"),
    ("model.moe.router_mode", "sequence", "router_mode"),
    ("model.num_kv_heads", 3, "num_heads=4 is not a multiple of model.num_kv_heads=3"),
    ("model.dtype", "float8", "model.dtype"),
    ("diffusion.beta", 2.0, "beta=2.0"),
    ("model.rope_scaling.type", "dynamic", "rope_scaling.type"),
    ("train.grad_accum_steps", 3, "grad_accum_steps=3"),
])
def test_config_validation_names_the_field(tiny_config, field, value, message):
  section, _, key = field.rpartition(".")
  target = tiny_config
  for part in section.split("."):
    target = target[part]
  target[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_config)


def test_named_configs_validate():
  for name in ("tiny", "quickstart", "synthetic", "chatdlm_7b", "qwen2_5_1_5b", "qwen3_8b",
               "long_context_retrieval"):
    config_lib.validate(load_config_file(name))


@pytest.mark.parametrize("slots,expected", [(0, 821_376), (2, 821_632)])
def test_long_context_retrieval_parameter_count(slots, expected):
  """The README's count; the summary model adds only its 2 x d_model slot embeddings."""
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  c = load_config_file("long_context_retrieval")
  c.model.summary.num_slots = slots
  model, _ = build.build_model(c)
  tree = jax.eval_shape(lambda: build.init_params(model, 0))
  assert sum(x.size for x in jax.tree.leaves(tree)) == expected
