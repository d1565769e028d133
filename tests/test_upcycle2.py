"""Hardening of sparse upcycling and the MoE router (top-1 gradient, frozen params, shared gate)."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.model import moe
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle


def _swiglu(x, wg, wu, wd):
  h = x @ wg
  return (h / (1.0 + np.exp(-h)) * (x @ wu)) @ wd


@pytest.mark.parametrize("router_func", ["softmax", "sigmoid"])
def test_top1_router_learns_from_the_lm_loss(router_func):
  """With top_k=1 the normalised weight p / p is the constant 1, so the router got an
  exactly zero gradient from the main loss (it learned from the aux losses alone; an
  upcycled top-1 model never learned to route). The weight stays 1 in the forward, and
  the gradient is sum_t g_t * d log p_t (g_t = <dL/dy_t, expert_t(x_t)>)."""
  b, t, d, e, f = 1, 8, 6, 4, 5
  cfg = moe.MoEConfig(num_experts=e, top_k=1, expert_dim=f, impl="dense",
                      router_func=router_func)
  layer = moe.MoEFeedForward(cfg)
  meta = masks.training_meta(t // 2, 4, b)
  x = jax.random.normal(jax.random.key(0), (b, 2 * t // 2, d))
  params = nn.unbox(layer.init(jax.random.key(1), x, meta)["params"])
  c = np.asarray(jax.random.normal(jax.random.key(2), x.shape))
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x, meta)[0] * c)
  grad = jax.jit(jax.grad(loss))(params)["router"]

  # Slow reference from the definition, token by token in numpy.
  xn = np.asarray(x)[0]
  logits = xn @ np.asarray(params["router"])
  chosen = logits.argmax(-1)  # Softmax and sigmoid are monotone: the top-1 expert.
  w = {k: np.asarray(params[k]) for k in ("wi_gate", "wi_up", "wo")}
  y = np.stack([_swiglu(xn[i], w["wi_gate"][j], w["wi_up"][j], w["wo"][j])
                for i, j in enumerate(chosen)])
  got_y, _ = layer.apply({"params": params}, x, meta)
  np.testing.assert_allclose(np.asarray(got_y)[0], y, rtol=1e-5, atol=1e-5)  # Weight 1.
  g = np.sum(c[0] * y, axis=-1)  # [T]

  def logp(router):
    lg = jnp.asarray(xn) @ router
    lp = jax.nn.log_softmax(lg) if router_func == "softmax" else jax.nn.log_sigmoid(lg)
    return jnp.sum(jnp.asarray(g) * lp[jnp.arange(len(chosen)), chosen])

  want = jax.grad(logp)(jnp.asarray(params["router"]))
  assert np.abs(np.asarray(want)).max() > 1e-2
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_upcycle_accepts_frozen_params():
  """flax FrozenDict params are mappings, not dicts: upcycling skipped every layer and
  said "no dense 'mlp' layer (already MoE?)"."""
  cfg = transformer.TransformerConfig(vocab_size=24, d_model=16, num_layers=2, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=24)
  params = build.init_params(transformer.Transformer(cfg), 0)
  want, want_cfg = upcycle.upcycle(params, cfg, 4, 2, seed=1)
  got, got_cfg = upcycle.upcycle(flax.core.freeze(params), cfg, 4, 2, seed=1)
  assert got_cfg == want_cfg
  flat_want = flax.traverse_util.flatten_dict(want)
  flat_got = flax.traverse_util.flatten_dict(flax.core.unfreeze(got))
  assert sorted(flat_got) == sorted(flat_want)
  for path, value in flat_want.items():
    np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(value))
  got_params = upcycle.upcycle_params(flax.core.freeze(params), 4, seed=1)
  assert all("moe" in got_params[f"layer_{i}"] for i in range(2))


def test_shared_expert_gate_needs_a_shared_expert():
  """The gate scales the shared expert; without one the flag was silently ignored."""
  with pytest.raises(ValueError, match=r"shared_expert_gate=True needs a shared expert.*"
                                       r"shared_expert_dim=0"):
    moe.MoEConfig(num_experts=4, top_k=2, shared_expert_gate=True)
  cfg = moe.MoEConfig(num_experts=4, top_k=2, shared_expert_dim=8, shared_expert_gate=True)
  assert cfg.shared_expert_gate


def test_anchored_introspective_loss_balances_the_clean_stream_too():
  """Anchored I-DLM runs the clean stream and the MASK slots as two forwards; only the
  second's MoE aux loss and metrics were kept, so the clean tokens (most of them) trained
  their routers with no load-balance or z-loss. Both now count, weighted by tokens."""
  from blockdiff_jax.diffusion import introspective  # pylint: disable=g-import-not-at-top
  v, mask_id, b, length, stride, k = 32, 31, 2, 16, 4, 2
  model = transformer.Transformer(transformer.TransformerConfig(
      vocab_size=v, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
      mlp_dim=24, mask_spec=masks.MaskSpec(causal_noisy=True),
      moe=moe.MoEConfig(num_experts=4, top_k=1, expert_dim=8, impl="dense",
                        load_balance_weight=1.0, z_loss_weight=0.1)))
  apply_fn, params = build.make_apply(model), build.init_params(model, 0)
  calls = []

  # Jitted pass by pass (the recorder needs concrete aux): op by op costs a loaded CPU.
  jitted = jax.jit(apply_fn, static_argnames=("return_kv",))

  def recording_apply(*args, **kwargs):
    out = jitted(*args, **kwargs)
    calls.append((args[1].shape[1], out[1]))
    return out

  batch = {"tokens": jax.random.randint(jax.random.key(1), (b, length), 0, mask_id),
           "loss_mask": jnp.ones((b, length))}
  obj = introspective.IntrospectiveObjective(stride, mask_id, anchors=k)
  loss, metrics = introspective.introspective_loss(recording_apply, params, batch,
                                                   jax.random.key(0), obj)
  (n_clean, clean), (n_noisy, noisy) = calls
  assert (n_clean, n_noisy) == (length, k * stride)
  mix = lambda c, n: (n_clean * float(c) + n_noisy * float(n)) / (n_clean + n_noisy)
  # The two passes route differently: the mixture is not either one alone.
  assert abs(float(clean["aux_loss"]) - float(noisy["aux_loss"])) > 1e-3
  for name in ("load_balance_loss", "router_z_loss", "unique_experts"):
    np.testing.assert_allclose(float(metrics[name]),
                               mix(clean["metrics"][name], noisy["metrics"][name]), rtol=1e-5)
  want_loss = (float(metrics["ce_noisy"]) + obj.clean_weight * float(metrics["ce_clean"])
               + mix(clean["aux_loss"], noisy["aux_loss"]))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


@pytest.mark.parametrize("shared", [0, 24])
def test_qwen2_moe_gates_its_shared_expert_only_when_it_has_one(shared):
  """The gate refusal above must not reject a Qwen2-MoE checkpoint without a shared
  expert: its config.json implies no gate then (transformers builds none at size 0)."""
  from blockdiff_jax.interop import architectures  # pylint: disable=g-import-not-at-top
  o = architectures.model_overrides({
      "model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
      "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
      "shared_expert_intermediate_size": shared})
  assert o["moe.shared_expert_gate"] == bool(shared)
  moe.MoEConfig(num_experts=4, top_k=2, expert_dim=16, shared_expert_dim=o[
      "moe.shared_expert_dim"], shared_expert_gate=o["moe.shared_expert_gate"])  # Valid.
