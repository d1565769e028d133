"""Sparse upcycling: at initialisation the upcycled MoE computes the dense model's logits."""

import dataclasses

import jax
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("num_experts,top_k,router_mode,impl", [
    (4, 2, "token", "dense"), (4, 2, "block", "ragged_dot"), (8, 1, "token", "ragged_dot")])
def test_upcycled_logits_equal_dense(scan, num_experts, top_k, router_mode, impl):
  cfg = transformer.TransformerConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, mlp_dim=48, scan_layers=scan)
  dense = transformer.Transformer(cfg)
  params = build.init_params(dense, 0)
  up_params, up_cfg = upcycle.upcycle(params, cfg, num_experts, top_k, seed=3)
  up_cfg = dataclasses.replace(up_cfg, moe=dataclasses.replace(
      up_cfg.moe, router_mode=router_mode, impl=impl))
  moe_model = transformer.Transformer(up_cfg)
  # The upcycled params have exactly the MoE model's tree and shapes.
  want = jax.tree.map(lambda x: x.shape, build.init_params(moe_model, 1))
  assert jax.tree.map(lambda x: x.shape, up_params) == want
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 40)
  meta = masks.training_meta(8, 4, 2)
  want_logits, _ = dense.apply({"params": params}, tokens, meta)
  got_logits, aux = moe_model.apply({"params": up_params}, tokens, meta)
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits),
                             atol=2e-5, rtol=2e-5)
  # The router is live: tokens do spread over more than top_k experts.
  assert np.asarray(aux["moe"]["unique_experts"]).min() > top_k


def test_upcycle_model_config_and_errors():
  m = model_config.default_model_config()
  m.moe.num_experts = 0
  m.mlp_dim = 96
  upcycle.upcycle_model_config(m, 8)
  assert (m.moe.num_experts, m.moe.expert_dim, m.moe.first_dense_layers) == (8, 96, 0)
  with pytest.raises(ValueError, match="top_k"):
    upcycle.upcycle_model_config(m, 1)
  with pytest.raises(ValueError, match="no dense 'mlp'"):
    upcycle.upcycle_params({"embed": {"embedding": np.zeros((2, 2))}}, 4)


def test_config_field_upcycles_the_pretrained_dense_checkpoint(tmp_path):
  """init.pretrained (a tiny Llama folder) + model.moe.upcycle_from_dense -> same logits."""
  from test_init_pretrained import _config, _tiny_folder  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.checkpoint import initial  # pylint: disable=g-import-not-at-top
  folder = _tiny_folder(tmp_path)
  c = _config(folder)
  dense_cfg, dense_model, _ = initial.build_model(c, str(tmp_path / "d"))
  dense_params = initial.initial_params(dense_cfg, dense_model, str(tmp_path / "d"))
  c.model.moe.upcycle_from_dense = True
  c.model.moe.num_experts = 4
  c.model.moe.top_k = 2
  up_cfg, up_model, _ = initial.build_model(c, str(tmp_path / "u"))
  assert up_cfg.model.moe.num_experts == 4 and up_cfg.model.moe.expert_dim == up_cfg.model.mlp_dim
  up_params = initial.initial_params(up_cfg, up_model, str(tmp_path / "u"))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 100)
  meta = masks.training_meta(8, 4, 2)
  want, _ = dense_model.apply({"params": dense_params}, tokens, meta)
  got, _ = up_model.apply({"params": up_params}, tokens, meta)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_trainable_moe_trains_only_routers_and_experts(scan):
  """train.trainable='moe': the upcycled MoE layers move, every other weight stays put,
  and the optimizer keeps moments only for the MoE layers."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.diffusion import losses  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import optimizer  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg = transformer.TransformerConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, mlp_dim=48, scan_layers=scan)
  params, up_cfg = upcycle.upcycle(build.init_params(transformer.Transformer(cfg), 0), cfg,
                                   4, 2, seed=3)
  model = transformer.Transformer(up_cfg)
  train = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, steps=10, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      weight_decay=0.1, grad_clip=1.0, trainable="moe"))
  tx = optimizer.make_optimizer(train)
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=39)
  step = jax.jit(step_lib.make_train_step(build.make_apply(model), obj, tx, lambda s: 0.01,
                                          trainable_mask=optimizer.mask_fn("moe")))
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 39, (2, 16)), jnp.int32),
           "loss_mask": jnp.ones((2, 16), jnp.float32)}
  state = state_lib.create(params, tx, False)
  for i in range(2):
    state, metrics = step(state, batch, jax.random.key(i))
    assert float(metrics["finite"]) == 1.0
  moved = {}
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(state.params),
                              jax.tree.leaves(params)):
    keys = [getattr(k, "key", None) for k in path]
    if "moe" in keys:
      moved[jax.tree_util.keystr(path)] = float(np.abs(np.asarray(new) - np.asarray(old)).max())
    else:
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
  assert moved and all(v > 0 for v in moved.values()), moved  # Router and every expert.
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state))
  moe_size = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                 if "moe" in [getattr(k, "key", None) for k in p])
  assert moments <= 2 * moe_size + 16  # mu and nu of the MoE layers (+ step counters).


def test_trainable_moe_needs_moe_layers():
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.train.trainable = "moe"
  c.model.moe.num_experts = 0
  with pytest.raises(ValueError, match="trainable='moe' needs MoE layers"):
    config_lib.validate(c)
  c.train.trainable = "experts"
  with pytest.raises(ValueError, match="train.trainable must be"):
    config_lib.validate(c)
