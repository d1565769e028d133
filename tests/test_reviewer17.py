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
