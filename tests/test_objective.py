"""BD3-LM objective: noise sampling, corruption, loss weights, and learning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax import masks
from blockdiff_jax.model import moe
from blockdiff_jax.model import transformer

MASK = 7


@pytest.mark.parametrize("beta,omega", [(1e-3, 1.0), (0.3, 0.8)])
def test_antithetic_block_noise_is_stratified_and_clipped(beta, omega):
  t = np.asarray(schedules.sample_block_t(jax.random.key(0), 4, 8, schedules.NoiseRange(beta, omega)))
  assert t.shape == (4, 8)
  assert (t >= beta).all() and (t <= omega).all()
  u = np.sort((t.ravel() - beta) / (omega - beta))
  # Exactly one draw in each of the 32 strata.
  np.testing.assert_array_equal(np.floor(u * 32), np.arange(32))


def test_noise_range_rejects_bad_interval():
  with pytest.raises(ValueError, match="beta=0.9"):
    schedules.NoiseRange(0.9, 0.5)


def test_prompt_tokens_are_never_masked_and_t_is_constant_per_block():
  x0 = jnp.arange(32).reshape(2, 16) % 5
  loss_mask = jnp.concatenate([jnp.zeros((2, 6)), jnp.ones((2, 10))], 1)
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=MASK,
                                       noise=schedules.NoiseRange(0.99, 1.0))
  xt, masked, t = losses.corrupt(jax.random.key(0), {"tokens": x0, "loss_mask": loss_mask}, obj)
  assert not np.asarray(masked)[:, :6].any()
  np.testing.assert_array_equal(np.asarray(xt)[:, :6], np.asarray(x0)[:, :6])
  assert np.asarray(masked)[:, 6:].mean() > 0.9
  np.testing.assert_array_equal(np.asarray(t).reshape(2, 4, 4), np.asarray(t)[:, ::4, None]
                                .repeat(4, -1))


@pytest.mark.parametrize("mask_value", [1.0, 0.5])
def test_loss_weights_follow_the_formula(mask_value):
  """The loss equals sum over masked tokens of CE / t, divided by scored tokens (the
  positions where loss_mask > 0: its value selects, it does not weigh)."""
  b, length, v, bs = 2, 8, 10, 4
  x0 = jax.random.randint(jax.random.key(1), (b, length), 0, MASK)
  batch = {"tokens": x0, "loss_mask": jnp.full((b, length), mask_value)}
  fixed = jax.random.normal(jax.random.key(2), (b, length, v))

  def apply_fn(params, tokens, meta, logits_slice):
    assert tokens.shape == (b, 2 * length) and logits_slice == (0, length)
    np.testing.assert_array_equal(meta.stream[0], [0] * length + [1] * length)
    return fixed * params, {"moe": {}}

  obj = losses.BlockDiffusionObjective(block_size=bs, mask_id=MASK)
  rng = jax.random.key(3)
  loss, metrics = losses.block_diffusion_loss(apply_fn, 1.0, batch, rng, obj)
  _, masked, t = losses.corrupt(rng, batch, obj)
  logits = np.asarray(fixed).copy()
  logits[..., MASK] = -np.inf
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(x0)[..., None], -1)[..., 0]
  want = np.sum(nll * np.asarray(masked) / np.asarray(t)) / (b * length)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["nelbo"], want, rtol=1e-5)
  assert float(metrics[losses.LOSS_TOKENS]) == b * length


def _tiny_model(num_experts=4, block_size=4):
  cfg = transformer.TransformerConfig(
      vocab_size=12, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=64, moe=moe.MoEConfig(num_experts=num_experts, expert_dim=32) if num_experts else None)
  return transformer.Transformer(cfg)


def test_noisy_block_sees_earlier_clean_blocks_but_not_its_own_clean_copy():
  """Information flow through the whole model, not only the mask."""
  length, bs = 12, 4
  model = _tiny_model()
  meta = masks.training_meta(length, bs, 1)
  x0 = jax.random.randint(jax.random.key(0), (1, length), 0, MASK)
  xt = jnp.full_like(x0, MASK)
  params = model.init(jax.random.key(1), jnp.concatenate([xt, x0], 1), meta)

  def noisy_logits(x0):
    return model.apply(params, jnp.concatenate([xt, x0], 1), meta, logits_slice=(0, length))[0]

  base = noisy_logits(x0)
  changed = noisy_logits(x0.at[0, 5].set((x0[0, 5] + 1) % MASK))  # A token of block 1.
  diff = np.abs(np.asarray(changed - base)).max(-1)[0]
  assert diff[:8].max() == 0.0  # Blocks 0 and 1 (its own block) are blind to it.
  assert diff[8:].min() > 0.0  # Block 2 sees clean block 1.


def test_tiny_model_overfits_one_batch():
  length, bs = 16, 4
  model = _tiny_model()
  x0 = jax.random.randint(jax.random.key(0), (4, length), 0, MASK)
  batch = {"tokens": x0, "loss_mask": jnp.ones((4, length))}
  obj = losses.BlockDiffusionObjective(block_size=bs, mask_id=MASK)
  meta = masks.training_meta(length, bs, 4)
  params = nn.unbox(model.init(jax.random.key(1), jnp.concatenate([x0, x0], 1), meta)["params"])
  apply_fn = lambda p, tok, m, **kw: model.apply({"params": p}, tok, m, **kw)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    (loss, _), g = jax.value_and_grad(losses.block_diffusion_loss, argnums=1, has_aux=True)(
        apply_fn, params, batch, rng, obj)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, loss

  eval_loss = lambda p: np.mean([losses.block_diffusion_loss(apply_fn, p, batch,
                                                             jax.random.key(100 + i), obj)[1]["nelbo"]
                                 for i in range(4)])
  first = eval_loss(params)
  for i in range(300):
    params, opt, _ = step(params, opt, jax.random.key(i))
  last = eval_loss(params)
  assert last < 0.25 * first, (first, last)
