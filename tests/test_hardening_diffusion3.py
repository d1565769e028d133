"""Objectives at their edges: loss-mask values, packed documents, the noise grid's top."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer

V, MASK = 32, 31
B, L, STRIDE = 2, 16, 4


@pytest.fixture(scope="module")
def causal_noisy_model():
  """A tiny model with causal noisy blocks (the introspective layout) and its apply_fn."""
  model = transformer.Transformer(transformer.TransformerConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, mask_spec=masks.MaskSpec(causal_noisy=True)))
  return build.make_apply(model), build.init_params(model, 0)


# Jitted whole: op-by-op dispatch of a loss costs seconds on a loaded CPU.
_introspective_loss = jax.jit(introspective.introspective_loss, static_argnums=(0, 4))
_ar_loss = jax.jit(autoregressive.autoregressive_loss, static_argnums=(0, 4))
_per_token_ce = jax.jit(introspective.per_token_ce, static_argnums=(0, 3))


def _tokens(seed=1):
  return jax.random.randint(jax.random.key(seed), (B, L), 0, MASK)


@pytest.mark.parametrize("anchors", [0, 3])
def test_introspective_loss_mask_selects_tokens_and_does_not_weigh_them(causal_noisy_model,
                                                                        anchors):
  # A 3.0 once counted its token three times: CE_clean was no longer the AR CE of the
  # scored tokens and loss_tokens (the accumulation weight) was inflated.
  apply_fn, params = causal_noisy_model
  x0 = _tokens()
  mask = np.ones((B, L), np.float32)
  mask[:, :4] = 0.0
  mask[0, 8:] = 3.0
  mask[1, 10:13] = 0.5
  obj = introspective.IntrospectiveObjective(STRIDE, MASK, anchors=anchors)
  rng = jax.random.key(0)
  _, got = _introspective_loss(
      apply_fn, params, {"tokens": x0, "loss_mask": jnp.asarray(mask)}, rng, obj)
  _, binary = _introspective_loss(
      apply_fn, params, {"tokens": x0, "loss_mask": jnp.asarray(mask > 0, jnp.float32)}, rng,
      obj)
  # The clean stream is the causal LM; the AR objective (checked against a slow loop in
  # test_objective_ar) scores the same targets with the same model.
  _, ar = _ar_loss(
      apply_fn, params, {"tokens": x0, "loss_mask": jnp.asarray(mask)}, None,
      autoregressive.AutoregressiveObjective(MASK))
  np.testing.assert_allclose(float(got["ce_clean"]), float(ar["ar_ce"]), rtol=1e-5)
  np.testing.assert_allclose(float(got["ce_noisy"]), float(binary["ce_noisy"]), rtol=1e-6)
  if anchors:  # Each slot k of an anchor a scores target a+k+1 when it is in the row.
    anchor = np.asarray(introspective.corrupt(rng, {"tokens": x0, "loss_mask": mask}, obj))
    target = anchor[:, :, None] + 1 + np.arange(STRIDE)
    want = np.sum((anchor[:, :, None] >= 0) & (target < L)
                  & (np.take_along_axis(mask, np.minimum(target, L - 1).reshape(B, -1), 1)
                     .reshape(target.shape) > 0))
  else:  # Slots of the first block see no clean token: not scored.
    want = np.sum((mask[:, 1:] > 0) & (np.arange(L - 1) >= STRIDE))
  assert float(got[losses.LOSS_TOKENS]) == want


@pytest.mark.parametrize("anchors", [0, 3])
def test_introspective_packed_document_is_scored_as_if_alone(causal_noisy_model, anchors):
  """Rewriting the first document changes nothing scored about the second one."""
  apply_fn, params = causal_noisy_model
  seg = np.zeros((B, L), np.int32)
  seg[0, 6:] = 1  # Starts inside a noisy block (stride 4).
  seg[1, 8:] = 1  # Starts on a block boundary.
  x0 = _tokens()
  x0_other = jnp.where(seg == 0, _tokens(seed=7), x0)
  obj = introspective.IntrospectiveObjective(STRIDE, MASK, anchors=anchors)
  batch = {"tokens": x0, "loss_mask": jnp.ones((B, L)), "segment_ids": jnp.asarray(seg)}
  # Enough anchors for some to land in each document; the same draw for both inputs.
  anchor = introspective.corrupt(jax.random.key(3), batch, obj) if anchors else None
  terms = [_per_token_ce(apply_fn, params, {**batch, "tokens": x}, obj, None, anchor)
           for x in (x0, x0_other)]
  # Position i targets token i+1; a target in the second document is scored only from
  # a position of that document (never the first document's last token).
  second = seg[:, 1:] == 1
  scored = np.asarray(terms[0]["weight"]) > 0
  np.testing.assert_array_equal(scored, seg[:, 1:] == seg[:, :-1])
  np.testing.assert_array_equal(np.asarray(terms[0]["clean_nll"])[second & scored],
                                np.asarray(terms[1]["clean_nll"])[second & scored])
  if anchors:
    slot_doc = np.repeat(np.take_along_axis(seg, np.asarray(anchor), 1), STRIDE, axis=1)
    noisy_scored = (np.asarray(terms[0]["noisy_weight"]) > 0) & (slot_doc == 1)
  else:
    noisy_scored = second & scored
  assert noisy_scored.sum() >= 3
  np.testing.assert_array_equal(np.asarray(terms[0]["noisy_nll"])[noisy_scored],
                                np.asarray(terms[1]["noisy_nll"])[noisy_scored])


@pytest.mark.parametrize("n", [4, 3 * 64])
def test_antithetic_top_stratum_stays_at_the_top(monkeypatch, n):
  # With u just below 1, (u + n - 1) / n rounds to 1.0 in float32; the modulo that
  # kept the grid in [0, 1) moved that draw from omega down to beta.
  top = np.nextafter(np.float32(1.0), np.float32(0.0))
  monkeypatch.setattr(jax.random, "uniform", lambda rng, shape: jnp.full(shape, top))
  noise = schedules.NoiseRange(0.2, 0.8)
  t = np.sort(np.asarray(schedules.sample_block_t(jax.random.key(0), n // 4, 4, noise)).ravel())
  # Stratum i holds (u + i) / n: every draw at the top of its own stratum.
  edges = noise.beta + (noise.omega - noise.beta) * (np.arange(n) + 1) / n
  np.testing.assert_allclose(t, edges, rtol=0, atol=1e-6)
