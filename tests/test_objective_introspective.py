"""Introspective objective against a slow reference: one causal pass per noisy block."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.model import lora
from blockdiff_jax.model import transformer

MASK = 15
V = 16


def _model(gated_lora=False):
  lcfg = lora.LoraConfig(rank=2, gated=True, mask_id=MASK) if gated_lora else None
  return transformer.Transformer(transformer.TransformerConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, lora=lcfg, mask_spec=masks.MaskSpec(causal_noisy=True)))


_PAD_TO = 16  # Every reference forward runs at this length: one compilation per model.


def _causal_logits(model, params, tokens):
  """Causal logits of ``tokens`` [1, t], one forward per call.

  The sequence is padded on the right to ``_PAD_TO``: with block size 1 the model is
  causal, so positions before ``t`` never see the padding (checked in
  test_reference_padding_is_invisible), and a fixed shape compiles once.
  """
  t = tokens.shape[1]
  padded = jnp.pad(tokens, ((0, 0), (0, _PAD_TO - t)), constant_values=MASK)
  return np.asarray(_apply_causal(model, params, padded))[0, :t]


@functools.partial(jax.jit, static_argnums=0)
def _apply_causal(model, params, tokens):
  meta = masks.make_meta(jnp.arange(tokens.shape[1])[None], 1, masks.CLEAN)
  return model.apply({"params": params}, tokens, meta)[0]


def _logsoftmax_no_mask(lg):
  lg = np.where(np.arange(V) == MASK, -np.inf, lg)
  m = lg.max(-1, keepdims=True)
  return lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))


def _reference(model, params, x0, stride, alpha):
  """CE_noisy + alpha CE_clean written from the definition, row by row, block by block."""
  nn_, nc = [], []
  for row in x0:
    length = len(row)
    clean = _logsoftmax_no_mask(_causal_logits(model, params, jnp.asarray(row)[None]))
    for i in range(length - 1):
      nc.append(-clean[i, row[i + 1]])
      start = (i // stride) * stride
      if not start:  # A block that sees nothing of the row: decoding never drafts there.
        continue
      seq = np.concatenate([row[:start], np.full(i - start + 1, MASK)])
      noisy = _logsoftmax_no_mask(_causal_logits(model, params, jnp.asarray(seq)[None]))
      nn_.append(-noisy[i, row[i + 1]])
  return np.mean(nn_) + alpha * np.mean(nc), np.mean(nn_), np.mean(nc)


@pytest.mark.parametrize("stride", [1, 3, 4])
@pytest.mark.parametrize("gated_lora", [False, True])
def test_loss_matches_slow_reference(stride, gated_lora):
  model = _model(gated_lora)
  rng = np.random.default_rng(stride)
  x0 = rng.integers(0, MASK, (2, 9)).astype(np.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(x0),
                               masks.make_meta(jnp.arange(9)[None], 1, masks.CLEAN))["params"])
  if gated_lora:  # Adapters nonzero, so the noisy stream differs from the base.
    params = jax.tree_util.tree_map_with_path(
        lambda p, w: 0.3 * jnp.ones_like(w) if lora.is_lora_path(p) else w, params)
  obj = introspective.IntrospectiveObjective(stride=stride, mask_id=MASK, clean_weight=0.2)
  apply_fn = lambda p, tok, meta: model.apply({"params": p}, tok, meta)
  batch = {"tokens": jnp.asarray(x0), "loss_mask": jnp.ones_like(x0)}
  loss, metrics = introspective.introspective_loss(apply_fn, params, batch, None, obj)
  want, want_noisy, want_clean = _reference(model, params, x0, stride, 0.2)
  np.testing.assert_allclose(metrics["ce_noisy"], want_noisy, rtol=2e-5)
  np.testing.assert_allclose(metrics["ce_clean"], want_clean, rtol=2e-5)
  np.testing.assert_allclose(loss, want, rtol=2e-5)


@pytest.mark.parametrize("gated_lora", [False, True])
def test_reference_padding_is_invisible(gated_lora):
  """The reference's right padding leaves the logits of the real positions unchanged."""
  model = _model(gated_lora)
  x = jnp.asarray(np.random.default_rng(0).integers(0, MASK, (1, 7)).astype(np.int32))
  meta = masks.make_meta(jnp.arange(7)[None], 1, masks.CLEAN)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), x, meta)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, w: 0.3 * jnp.ones_like(w) if lora.is_lora_path(p) else w, params)
  unpadded = np.asarray(model.apply({"params": params}, x, meta)[0][0])
  np.testing.assert_allclose(_causal_logits(model, params, x), unpadded, rtol=1e-5, atol=1e-5)


def test_validation():
  with pytest.raises(ValueError, match="isd_stride"):
    introspective.IntrospectiveObjective(stride=0, mask_id=1)


def _anchored_reference(model, params, x0, loss_mask, anchors, stride):
  """Mean CE over anchored slots: one causal forward of x0[:a] + N MASKs per anchor."""
  total, count = 0.0, 0
  for row, row_anchors in enumerate(np.asarray(anchors)):
    for a in row_anchors:
      if a < 0:
        continue
      seq = np.concatenate([x0[row, :a], np.full(stride, MASK)])
      logp = _logsoftmax_no_mask(_causal_logits(model, params, jnp.asarray(seq)[None]))
      for j in range(stride):
        t = a + j + 1
        if t < x0.shape[1] and loss_mask[row, t]:
          total += -logp[a + j, x0[row, t]]
          count += 1
  return total / count


@pytest.mark.parametrize("stride,k,detach", [(1, 3, False), (3, 2, True), (4, 4, False)])
def test_anchored_blocks_match_slow_reference(stride, k, detach):
  model = _model(gated_lora=True)
  rng = np.random.default_rng(stride + k)
  x0 = rng.integers(0, MASK, (2, 12)).astype(np.int32)
  loss_mask = np.ones_like(x0)
  loss_mask[:, :4] = 0  # A prompt: never an anchor's first target.
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(x0),
                               masks.make_meta(jnp.arange(12)[None], 1, masks.CLEAN))["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, w: 0.3 * jnp.ones_like(w) if lora.is_lora_path(p) else w, params)
  obj = introspective.IntrospectiveObjective(stride=stride, mask_id=MASK, clean_weight=0.2,
                                             anchors=k, detach_clean=detach)
  apply_fn = lambda p, tok, meta, **kw: model.apply({"params": p}, tok, meta, **kw)
  batch = {"tokens": jnp.asarray(x0), "loss_mask": jnp.asarray(loss_mask)}
  anchors = introspective.corrupt(jax.random.key(3), batch, obj)
  a = np.asarray(anchors)
  assert a.shape == (2, k) and (a >= 3).all() and (a <= 10).all()
  assert all(len(set(r)) == k for r in a)  # Distinct.
  loss, metrics = introspective.introspective_loss(apply_fn, params, batch, None, obj, anchors)
  want = _anchored_reference(model, params, x0, loss_mask, a, stride)
  np.testing.assert_allclose(metrics["ce_noisy"], want, rtol=2e-5)
  assert np.isfinite(float(loss))


def test_detached_clean_stream_gives_the_same_adapter_gradient():
  """With gated adapters the clean stream carries no adapter gradient: detaching is exact."""
  model = _model(gated_lora=True)
  x0 = np.random.default_rng(0).integers(0, MASK, (2, 12)).astype(np.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(x0),
                               masks.make_meta(jnp.arange(12)[None], 1, masks.CLEAN))["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, w: 0.3 * jnp.ones_like(w) if lora.is_lora_path(p) else w, params)
  apply_fn = lambda p, tok, meta, **kw: model.apply({"params": p}, tok, meta, **kw)
  batch = {"tokens": jnp.asarray(x0), "loss_mask": jnp.ones_like(jnp.asarray(x0))}
  grads = []
  for detach in (False, True):
    obj = introspective.IntrospectiveObjective(stride=3, mask_id=MASK, clean_weight=0.0,
                                               anchors=3, detach_clean=detach)
    anchors = introspective.corrupt(jax.random.key(0), batch, obj)
    g = jax.jit(jax.grad(lambda p: introspective.introspective_loss(  # pylint: disable=cell-var-from-loop
        apply_fn, p, batch, None, obj, anchors)[0]))(params)
    grads.append(g)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]),
                          jax.tree.leaves(grads[1])):
    if lora.is_lora_path(path):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert max(float(np.abs(np.asarray(a)).max()) for p, a in
             jax.tree_util.tree_leaves_with_path(grads[1]) if lora.is_lora_path(p)) > 0
