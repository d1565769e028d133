"""Gated LoRA: fresh adapters equal the base; gated adapters leave clean tokens exact."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import lora
from blockdiff_jax.model import transformer
from blockdiff_jax.train import optimizer

MASK = 15


def _cfg(lora_cfg=None, scan=False):
  return transformer.TransformerConfig(
      vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, lora=lora_cfg, scan_layers=scan)


def _inputs(seed=0, b=2, t=10):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MASK, (b, t))
  tokens[:, t // 2:] = np.where(rng.random((b, t - t // 2)) < 0.6, MASK, tokens[:, t // 2:])
  tokens = jnp.asarray(tokens, jnp.int32)
  meta = masks.make_meta(jnp.broadcast_to(jnp.arange(t), (b, t)), 1, masks.CLEAN)
  return tokens, meta


def _split(params):
  """(base params, lora params) of a LoRA model: the base tree without adapters."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  base = {}
  for path, leaf in flat:
    keys = tuple(k.key for k in path)
    if lora.is_lora_path(keys):
      continue
    d = base
    for k in keys[:-1]:
      d = d.setdefault(k, {})
    d[keys[-1]] = leaf
  return base


def _perturb(params, seed=1):
  """LoRA B (and A) set to random nonzero values (the same in every process: crc32, not
  the per-process salted ``hash``)."""
  key = jax.random.PRNGKey(seed)
  def f(path, p):
    keys = tuple(getattr(k, "key", k) for k in path)
    if lora.is_lora_path(keys):
      return 0.5 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(repr(keys).encode())), p.shape)
    return p
  return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("targets", [lora.TARGETS, ("q", "v"), ("o", "down")])
@pytest.mark.parametrize("scan", [False, True])
def test_gated_lora_clean_positions_exact(targets, scan):
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets, gated=True, mask_id=MASK)
  model = transformer.Transformer(_cfg(lcfg, scan))
  base_model = transformer.Transformer(_cfg(None, scan))
  tokens, meta = _inputs()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, meta)["params"])
  base_params = _split(params)
  want = base_model.apply({"params": base_params}, tokens, meta)[0]
  # B = 0 at init: the whole model equals the base.
  np.testing.assert_array_equal(model.apply({"params": params}, tokens, meta)[0], want)
  got = model.apply({"params": _perturb(params)}, tokens, meta)[0]
  is_mask = np.asarray(tokens == MASK)
  # Clean tokens attend only to clean tokens here (causal, no MASK before the first
  # MASK), so positions before the first MASK of a row are bit-exact base outputs.
  first_mask = np.where(is_mask.any(1), is_mask.argmax(1), tokens.shape[1])
  for row in range(tokens.shape[0]):
    np.testing.assert_array_equal(got[row, :first_mask[row]], want[row, :first_mask[row]])
  assert np.abs(np.asarray(got)[is_mask] - np.asarray(want)[is_mask]).max() > 1e-3


def test_gated_lora_clean_token_exact_when_not_attending_masks():
  """A clean token that sees no MASK token is exact, whatever the later MASKs are."""
  lcfg = lora.LoraConfig(rank=2, gated=True, mask_id=MASK)
  model = transformer.Transformer(_cfg(lcfg))
  tokens = jnp.asarray([[1, 2, 3, 4, MASK, MASK, 5, MASK]], jnp.int32)
  # Causal within one segment: causal mask via block_size=1 clean stream.
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  params = _perturb(nn.unbox(model.init(jax.random.PRNGKey(0), tokens, meta)["params"]), seed=3)
  base = transformer.Transformer(_cfg(None)).apply({"params": _split(params)}, tokens, meta)[0]
  got = model.apply({"params": params}, tokens, meta)[0]
  np.testing.assert_array_equal(got[:, :4], base[:, :4])
  assert np.abs(np.asarray(got[:, 4:] - base[:, 4:])).max() > 1e-3


def test_plain_lora_changes_every_position():
  lcfg = lora.LoraConfig(rank=2, gated=False)
  model = transformer.Transformer(_cfg(lcfg))
  tokens, meta = _inputs(seed=2)
  params = _perturb(nn.unbox(model.init(jax.random.PRNGKey(0), tokens, meta)["params"]))
  base = transformer.Transformer(_cfg(None)).apply({"params": _split(params)}, tokens, meta)[0]
  got = model.apply({"params": params}, tokens, meta)[0]
  assert (np.abs(np.asarray(got - base)).max(-1) > 1e-4).all()


def test_lora_optimizer_freezes_base():
  lcfg = lora.LoraConfig(rank=2, gated=False)
  model = transformer.Transformer(_cfg(lcfg))
  tokens, meta = _inputs()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, meta)["params"])
  train = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, steps=10, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      weight_decay=0.1, grad_clip=1.0, trainable="lora"))
  opt = optimizer.make_optimizer(train)
  state = opt.init(params)
  loss = lambda p: jnp.mean(model.apply({"params": p}, tokens, meta)[0] ** 2)
  for _ in range(2):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    params2 = optax.apply_updates(params, updates)
    params, old = params2, params
  for path, new in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(k.key for k in path)
    oldv = dict(jax.tree_util.tree_flatten_with_path(old)[0])[path]
    if lora.is_lora_path(keys):
      continue
    np.testing.assert_array_equal(new, oldv)
  b = params["layer_0"]["attention"]["query"]["lora_b"]
  assert np.abs(np.asarray(b)).max() > 0


def test_lora_config_validation():
  with pytest.raises(ValueError, match="model.lora.targets"):
    lora.LoraConfig(targets=("nope",), gated=False)
  with pytest.raises(ValueError, match="mask_id"):
    lora.LoraConfig(gated=True)
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=0, gated=False)


@pytest.mark.parametrize("targets", [lora.TARGETS, ("q", "v"), ("o", "down")])
@pytest.mark.parametrize("scan", [False, True])
def test_merged_plain_lora_equals_adapters(targets, scan):
  """W + scale A B in a model without adapters gives the adapted model's logits."""
  lcfg = lora.LoraConfig(rank=3, alpha=5.0, targets=targets, gated=False)
  model = transformer.Transformer(_cfg(lcfg, scan=scan))
  tokens, meta = _inputs(seed=3)
  params = _perturb(nn.unbox(model.init(jax.random.PRNGKey(0), tokens, meta)["params"]))
  merged = lora.merge_adapters(params, lcfg)
  assert not any(lora.is_lora_path(tuple(k.key for k in path))
                 for path, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
  plain = transformer.Transformer(_cfg(None, scan=scan))
  want = model.apply({"params": params}, tokens, meta)[0]
  got = plain.apply({"params": merged}, tokens, meta)[0]
  base = plain.apply({"params": _split(params)}, tokens, meta)[0]
  # The adapters matter here (so equality is not the base's), and folding keeps them.
  assert np.abs(np.asarray(want - base)).max() > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  # Only projections with an adapter changed.
  flat_m = dict(jax.tree_util.tree_flatten_with_path(merged)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(_split(params))[0]:
    name = [k.key for k in path]
    proj = name[-3] if len(name) >= 3 else ""
    proj = {"query": "q", "key": "k", "value": "v", "out": "o"}.get(proj, proj)
    changed = not np.array_equal(np.asarray(flat_m[path]), np.asarray(leaf))
    assert changed == (name[-1] == "kernel" and proj in targets), name


def test_merge_refuses_gated_adapters():
  lcfg = lora.LoraConfig(rank=2, gated=True, mask_id=MASK)
  model = transformer.Transformer(_cfg(lcfg))
  tokens, meta = _inputs()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, meta)["params"])
  with pytest.raises(ValueError, match="gated"):
    lora.merge_adapters(params, lcfg)
