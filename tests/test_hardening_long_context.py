"""Long-context hardening: summary masks, the structured path and full-rank factored K/V
against slow references written from the definitions (DESIGN.md §4, ChatDLM), on
less-travelled inputs (S = 1, W = 0/1, W >= number of blocks, packed and padded rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops
from blockdiff_jax.model import factored_kv
from blockdiff_jax.model import rope
from blockdiff_jax.model import summary_attention


def _tokens(streams, length, block, slots, seg):
  """Per-position records of ``[streams ; slots]`` built without ``masks`` helpers."""
  out = []
  for s in range(streams):
    stream = masks.CLEAN if s == streams - 1 else masks.NOISY
    out += [dict(pos=i, blk=i // block, st=stream, seg=int(seg[i]), summ=False)
            for i in range(length)]
  for c in range(length // block):
    last = c * block + block - 1  # A slot sits at its block's last token.
    out += [dict(pos=last, blk=c, st=masks.CLEAN, seg=int(seg[last]), summ=True)] * slots
  return out


def _allowed(q, k, w, causal_noisy, causal_clean):
  """The mask from its definition, one (query, key) pair at a time."""
  if k["seg"] < 0 or q["seg"] != k["seg"]:
    return False
  if q["summ"]:  # A slot reads its own clean block and sibling slots.
    return k["st"] == masks.CLEAN and k["blk"] == q["blk"]
  if k["st"] == masks.NOISY:  # Only noisy queries read noisy keys, in their block.
    return (q["st"] == masks.NOISY and k["blk"] == q["blk"]
            and (not causal_noisy or k["pos"] <= q["pos"]))
  if k["summ"]:  # Slots only of blocks older than the window.
    return w > 0 and k["blk"] < q["blk"] - w
  last = q["blk"] - 1 if q["st"] == masks.NOISY else q["blk"]
  ok = k["blk"] <= last and (w == 0 or k["blk"] >= q["blk"] - w)
  if causal_clean and q["st"] == masks.CLEAN and k["blk"] == q["blk"]:
    ok = ok and k["pos"] <= q["pos"]
  return ok


def _meta(toks):
  col = lambda name, dtype: jnp.asarray(np.array([[t[name] for t in toks]]), dtype)
  return masks.TokenMeta(positions=col("pos", jnp.int32), block_ids=col("blk", jnp.int32),
                         stream=col("st", jnp.int32), segment_ids=col("seg", jnp.int32),
                         is_summary=col("summ", bool))


def _segments(kind, length):
  seg = np.zeros(length, int)
  if kind == "packed":
    seg[length // 2 + 1:] = 1  # A document boundary inside a block.
  elif kind == "tail_pad":
    seg[length - 2:] = -1
  elif kind == "head_pad":
    seg[:3] = -1
  return seg


# (streams, block, slots, window, blocks, segments)
CASES = [(2, 3, 1, 1, 4, "packed"), (1, 2, 2, 5, 3, "tail_pad"), (2, 2, 1, 2, 4, "head_pad"),
         (2, 1, 2, 1, 5, "one"), (1, 3, 1, 1, 1, "one"), (2, 3, 2, 3, 3, "packed")]


@pytest.mark.parametrize("causal", [(False, False), (True, True)])
@pytest.mark.parametrize("case", CASES)
def test_mask_matches_the_definition(case, causal):
  streams, block, slots, window, blocks, kind = case
  length = block * blocks
  seg = _segments(kind, length)
  toks = _tokens(streams, length, block, slots, seg)
  meta = _meta(toks)
  spec = masks.MaskSpec(*causal, window_blocks=window)
  want = np.array([[_allowed(q, k, window, *causal) for k in toks] for q in toks])
  np.testing.assert_array_equal(np.asarray(masks.dense_mask(meta, meta, spec))[0], want)
  # The slot metadata helper agrees with the hand layout (last token's position/segment).
  clean = meta.slice((streams - 1) * length, length)
  got = masks.summary_slots_meta(clean, block, slots)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(meta.slice(streams * length,
                                                                   blocks * slots))):
    np.testing.assert_array_equal(a, b)


def test_window_zero_hides_slots_and_shows_every_earlier_block():
  toks = _tokens(2, 8, 2, 1, np.zeros(8, int))
  meta = _meta(toks)
  want = np.array([[_allowed(q, k, 0, False, False) for k in toks] for q in toks])
  got = np.asarray(masks.dense_mask(meta, meta, masks.MaskSpec(window_blocks=0)))[0]
  np.testing.assert_array_equal(got, want)
  assert not got[:16, 16:].any()  # No token reads a slot without a window.


def _numpy_attention(q, k, v, allowed):
  q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
  groups = q.shape[1] // k.shape[1]
  out = np.zeros_like(q)
  for h in range(q.shape[1]):
    logits = q[:, h] @ k[:, h // groups].T / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    p = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    den = p.sum(axis=1, keepdims=True)
    out[:, h] = (p / np.where(den > 0, den, 1.0)) @ v[:, h // groups]
  return out


@pytest.mark.parametrize("case", CASES[:4])
def test_structured_path_matches_references(case):
  streams, block, slots, window, blocks, kind = case
  length = block * blocks
  toks = _tokens(streams, length, block, slots, _segments(kind, length))
  meta = _meta(toks)
  total, heads, kv_heads, dim = len(toks), 2, 1, 4
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (1, total, heads, dim))
  k = jax.random.normal(keys[1], (1, total, kv_heads, dim))
  v = jax.random.normal(keys[2], (1, total, kv_heads, dim))
  do = jax.random.normal(keys[3], (1, total, heads, dim))
  spec = masks.MaskSpec(causal_noisy=True, window_blocks=window)
  layout = masks.SummaryLayout(streams, block, slots)
  structured = lambda q, k, v: summary_attention.structured_attention(q, k, v, meta, layout,
                                                                      spec)
  dense = lambda q, k, v: attention_ops.masked_attention(q, k, v, meta, meta, spec)
  out, vjp = jax.vjp(structured, q, k, v)
  allowed = np.array([[_allowed(a, b, window, True, False) for b in toks] for a in toks])
  np.testing.assert_allclose(out[0], _numpy_attention(q, k, v, allowed), atol=2e-5)
  ref_out, ref_vjp = jax.vjp(dense, q, k, v)
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  for got, want in zip(vjp(do), ref_vjp(do)):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("head_dim,chunk,sinks", [(6, 5, 2), (8, 3, 0)])
def test_factored_kv_at_full_rank_is_exact(head_dim, chunk, sinks):
  # Chunks factorised by SVD at rank min(chunk, head_dim) expand back to the keys
  # (RoPE undone before factoring, reapplied at positions g * chunk + c) and values.
  rng = np.random.default_rng(0)
  batch, groups, heads = 2, 3, 2
  n = groups * chunk
  inv, _ = rope.inverse_frequencies(head_dim, 10000.0, rope.RopeScaling())
  inv = tuple(float(x) for x in np.asarray(inv))
  raw_k = rng.normal(size=(batch, n, heads, head_dim)).astype(np.float32)
  vals = rng.normal(size=(batch, n, heads, head_dim)).astype(np.float32)
  pos = np.broadcast_to(np.arange(n), (batch, n))
  # Reference rotation in numpy (half-split pairs), independent of rope.apply_rope.
  ang = pos[..., None] * np.asarray(inv)[None, None]
  x1, x2 = np.split(raw_k.astype(np.float64), 2, axis=-1)
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  keys = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def factor(x):
    x = np.moveaxis(x.reshape(batch, groups, chunk, heads, head_dim), 3, 2)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return jnp.asarray(u * s[..., None, :], jnp.float32), jnp.asarray(vt, jnp.float32)

  (ka, kb), (va, vb) = factor(raw_k), factor(vals)
  f = factored_kv.FactoredKV(key_a=ka, key_b=kb, value_a=va, value_b=vb,
                             sink_k=jnp.asarray(keys[:, :sinks], jnp.float32),
                             sink_v=jnp.asarray(vals[:, :sinks]), inv_freq=inv)
  k, v = f.dense(jnp.float32)
  np.testing.assert_allclose(k, keys, atol=2e-5)
  np.testing.assert_allclose(v, vals, atol=2e-5)
  ek, _ = f.extend(jnp.zeros((batch, 1, heads, head_dim)), jnp.zeros((batch, 1, heads, head_dim)))
  np.testing.assert_allclose(ek[:, 1:], keys, atol=2e-5)


def test_ntk_is_static_and_differs_from_dynamic_at_its_initial_length():
  # Our "ntk" always scales the base by s^(d/(d-2)); transformers' "dynamic" leaves it
  # unscaled up to max_position_embeddings (the docstring must not claim otherwise).
  d, theta, s = 8, 10000.0, 4.0
  inv, factor = rope.inverse_frequencies(d, theta, rope.RopeScaling(type="ntk", factor=s))
  want = 1.0 / (theta * s ** (d / (d - 2))) ** (np.arange(0, d, 2) / d)
  np.testing.assert_allclose(np.asarray(inv, np.float64), want, rtol=3e-6)
  assert factor == 1.0
