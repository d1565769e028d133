"""reviewer17: I-DLM's noisy slots whose block sees nothing of their document (a packed
document starting inside or at a stride block, the row's first block, an anchor at a
document's start) are not scored: decoding never drafts from no context.

Reference: a slow loop over positions: slot i is scored when its target is and some
position before its block start holds its document.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.diffusion import introspective

V, MASK = 11, 10


def _zero_logits(params, tokens, meta, cache=None, return_kv=False):
  del params, meta, cache
  logits = jnp.zeros(tokens.shape + (V,))
  aux = {}
  if return_kv:
    kv = jnp.zeros((1,) + tokens.shape + (1, 2))
    aux["kv"] = (kv, kv)
  return logits, aux


def _batch(seg, loss=None):
  seg = np.asarray(seg, np.int32)
  return {"tokens": np.arange(seg.size, dtype=np.int32).reshape(seg.shape) % 9,
          "segment_ids": seg,
          "loss_mask": np.ones(seg.shape, np.float32) if loss is None else loss}


def _reference(seg, stride):
  b, length = seg.shape
  out = np.zeros((b, length - 1))
  for r in range(b):
    for i in range(length - 1):
      start = i // stride * stride
      same_doc = seg[r, i + 1] == seg[r, i] and seg[r, i] >= 0
      context = any(seg[r, p] == seg[r, i] for p in range(start))
      out[r, i] = float(same_doc and context)
  return out


@pytest.mark.parametrize("seg", [
    [[0, 0, 0, 0, 0, 0, 1, 1]],  # Document 1 starts inside the second block.
    [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]],  # Documents start at block starts.
    [[0] * 12, [0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1, -1]],
])
@pytest.mark.parametrize("stride", [2, 4])
def test_full_layout_scores_only_slots_that_see_their_document(seg, stride):
  seg = np.asarray(seg)
  obj = introspective.IntrospectiveObjective(stride=stride, mask_id=MASK)
  out = introspective.per_token_ce(_zero_logits, None, _batch(seg), obj)
  np.testing.assert_array_equal(np.asarray(out["noisy_weight"]), _reference(seg, stride))
  # The clean stream's targets are unchanged: every same-document next token.
  assert np.asarray(out["weight"]).sum() > np.asarray(out["noisy_weight"]).sum()


def test_no_anchor_at_a_documents_start():
  seg = np.array([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]] * 2)
  obj = introspective.IntrospectiveObjective(stride=2, mask_id=MASK, anchors=4)
  starts = {0, 3, 6}
  for i in range(20):
    anchors = np.asarray(introspective.corrupt(jax.random.key(i), _batch(seg), obj))
    assert not set(anchors[anchors >= 0].tolist()) & starts
  # Given one anyway (a caller's anchors), its slots are not scored.
  out = introspective.per_token_ce(_zero_logits, None, _batch(seg), obj,
                                   corrupted=jnp.array([[3, 4, -1, -1], [0, 7, -1, -1]]))
  w = np.asarray(out["noisy_weight"]).reshape(2, 4, 2)
  assert w[0, 0].sum() == 0 and w[1, 0].sum() == 0  # Anchors 3 and 0: document starts.
  # Anchors 4 and 7 see positions 3 and 6 of their documents (slot 5's target, token 6,
  # is the next document's).
  assert w[0, 1].tolist() == [1, 0] and w[1, 1].tolist() == [1, 1]


def test_unused_anchors_are_no_tokens_of_the_moe_statistics():
  """A row with one scored target and 4 anchors: 3 are placeholders. Their MASK slots
  counted as noisy tokens in the aux mix and were routed into the load-balance loss;
  the reference is the same batch with a single anchor (the same draw: Gumbel top-1)."""
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  from conftest import small_model_config  # pylint: disable=g-import-not-at-top
  c = small_model_config(num_layers=1)
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  apply_fn = build.make_apply(model)
  x0 = np.random.default_rng(0).integers(10, 200, (1, 16)).astype(np.int32)
  loss = np.zeros((1, 16), np.float32)
  loss[0, 9] = 1.0  # Only target 9 (anchor 8) is scored.
  batch = {"tokens": x0, "loss_mask": loss, "segment_ids": np.zeros_like(x0)}
  out = {}
  for k in (1, 4):
    obj = introspective.IntrospectiveObjective(stride=2, mask_id=tok.mask_id, anchors=k)
    _, out[k] = introspective.introspective_loss(apply_fn, params, batch, jax.random.key(0),
                                                 obj)
  for name in ("load_balance_loss", "router_z_loss"):
    key = next(m for m in out[1] if m.endswith(name))
    np.testing.assert_allclose(out[4][key], out[1][key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(out[4]["ce_noisy"], out[1]["ce_noisy"], rtol=1e-5)
