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
      up_cfg.moe, router_mode=router_mode, impl=impl, block_min_experts=top_k))
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
