"""Hierarchical KV cache: the cache against a numpy reference, decoders against the full cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.model import kv_memory
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

SPEC = kv_cache.KVSpec(num_layers=2, num_kv_heads=2, head_dim=6)


def _np_rope(x, positions, inv_freq):
  """Half-split RoPE of x [L, T, H, D] by positions [T] (numpy, float64)."""
  ang = positions[:, None] * np.asarray(inv_freq)[None]  # [T, D/2]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _reference_view(full_k, frontier, valid, hy, inv_freq=None):
  """{position: key [L, H, D]} a row should see: rank-r chunks below the cut, exact above.

  With ``inv_freq`` the keys are factorised with their rotation undone, then rotated back.
  """
  ring = (hy.window + 1) * hy.chunk
  cut = -(-max(frontier - ring, 0) // hy.chunk) * hy.chunk
  out = {}
  for g in range(cut // hy.chunk):
    lo = g * hy.chunk
    if g < hy.sinks:  # Attention sinks stay exact.
      out.update({p: full_k[:, p] for p in range(lo, lo + hy.chunk) if valid[p]})
      continue
    pos = np.arange(lo, lo + hy.chunk, dtype=np.float64)
    x = full_k[:, lo:lo + hy.chunk].astype(np.float64)  # [L, C, H, D]
    if inv_freq is not None:
      x = _np_rope(x, -pos, inv_freq)
    x = x * valid[lo:lo + hy.chunk, None, None]
    u, s, vt = np.linalg.svd(np.transpose(x, (0, 2, 1, 3)), full_matrices=False)
    r = min(hy.rank, s.shape[-1])
    approx = np.einsum("lhcr,lhr,lhrd->lchd", u[..., :r], s[..., :r], vt[..., :r, :])
    if inv_freq is not None:
      approx = _np_rope(approx, pos, inv_freq)
    for i in range(hy.chunk):
      if valid[lo + i]:
        out[lo + i] = approx[:, i]
  for p in range(cut, frontier):
    if valid[p]:
      out[p] = full_k[:, p]
  return out


def _view_by_position(view, row):
  view = hc.dense_view(view)
  seg = np.asarray(view["meta"].segment_ids[row])
  pos = np.asarray(view["meta"].positions[row])
  k = np.asarray(view["k"][:, row])
  got = {}
  for j in np.nonzero(seg >= 0)[0]:
    assert int(pos[j]) not in got, f"position {pos[j]} seen twice"
    got[int(pos[j])] = k[:, j]
  return got


@pytest.mark.parametrize("window,chunk,rank,width,rope,sinks", [
    (1, 4, 2, 1, False, 0), (2, 4, 3, 3, True, 1), (1, 8, 8, 8, False, 1),
    (3, 2, 1, 2, True, 3)])
def test_cache_matches_reference_through_prefill_and_commits(window, chunk, rank, width,
                                                             rope, sinks):
  hy = hc.Hierarchy(window=window, chunk=chunk, rank=rank, sinks=sinks)
  inv_freq = (1.0, 0.3, 0.01) if rope else None
  spec = kv_cache.KVSpec(SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim,
                         inv_freq=inv_freq)
  batch, capacity = 3, 44
  rng = np.random.default_rng(window * 100 + chunk)
  full_k = rng.normal(size=(SPEC.num_layers, batch, capacity, SPEC.num_kv_heads,
                            SPEC.head_dim)).astype(np.float32)
  full_v = full_k * 0.5 + 1.0
  length = np.array([44, 30, 41])
  exists = np.arange(capacity)[None] < length[:, None]
  prompt = np.array([17, 2, 9])
  n = 20
  valid = np.arange(n)[None] < prompt[:, None]
  cache = hc.HierarchicalKVCache.empty(spec, batch, capacity, 4, hy)
  cache = cache.prefill(jnp.asarray(full_k[:, :, :n]), jnp.asarray(full_v[:, :, :n]),
                        jnp.asarray(valid))
  frontier = prompt.copy()
  commit = jax.jit(lambda c, k, v, s, r, e: c.commit(k, v, s, r, e))
  seen_compression = False
  for step in range(30):
    rows = rng.random(batch) < 0.7
    start = frontier.copy()
    idx = np.clip(start[:, None] + np.arange(width)[None], 0, capacity - 1)
    k = np.take_along_axis(full_k, idx[None, :, :, None, None], axis=2)
    v = np.take_along_axis(full_v, idx[None, :, :, None, None], axis=2)
    cache = commit(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(start, jnp.int32),
                   jnp.asarray(rows), jnp.asarray(exists))
    for b in range(batch):
      if rows[b]:
        frontier[b] = min(start[b] + width, length[b])
    np.testing.assert_array_equal(np.asarray(cache.frontier), frontier)
    view = cache.attention_view()
    row_valid = exists & (np.arange(capacity)[None] < frontier[:, None])
    for b in range(batch):
      want = _reference_view(full_k[:, b], int(frontier[b]), row_valid[b], hy, inv_freq)
      got = _view_by_position(view, b)
      assert sorted(got) == sorted(want), (step, b)
      for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=2e-4, rtol=1e-4)
    seen_compression |= bool(np.any(np.asarray(cache.compressed) > 0))
  assert seen_compression


def test_low_rank_error_is_the_svd_tail():
  # Eckart-Young: the relative Frobenius error of a rank-r chunk is its singular-value tail.
  hy = hc.Hierarchy(window=1, chunk=8, rank=2, sinks=0)
  rng = np.random.default_rng(0)
  k = rng.normal(size=(1, 1, 24, 1, 6)).astype(np.float32)
  cache = hc.HierarchicalKVCache.empty(kv_cache.KVSpec(1, 1, 6), 1, 24, 8, hy)  # no sinks
  cache = cache.prefill(jnp.asarray(k), jnp.asarray(k), jnp.ones((1, 24), bool))
  assert int(cache.compressed[0]) == 1  # frontier 24, ring 16: chunk 0 left the ring.
  by_pos = _view_by_position(cache.attention_view(), 0)
  got = np.stack([by_pos[p][0, 0] for p in range(8)])
  s = np.linalg.svd(k[0, 0, :8, 0], compute_uv=False)
  err = np.linalg.norm(got - k[0, 0, :8, 0]) / np.linalg.norm(k[0, 0, :8, 0])
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)), rtol=1e-4)
  assert err > 0.1  # Random keys are far from rank 2: the approximation is real.


def test_keys_low_rank_before_rope_compress_exactly_with_the_rotation_undone():
  """Rank-2 keys, then rotated: factorising the rotated keys loses them, undoing RoPE first
  (what the model's KVSpec enables) keeps them."""
  rng = np.random.default_rng(1)
  inv_freq = tuple(float(x) for x in 1.0 / 100.0 ** (np.arange(0, 8, 2) / 8))
  pre = rng.normal(size=(1, 1, 32, 1, 2)) @ rng.normal(size=(2, 8))  # [1, 1, T, 1, 8]
  pos = np.arange(32.0)
  k = _np_rope(pre[:, 0], pos, inv_freq)[:, None].astype(np.float32)
  errs = {}
  for freq in (None, inv_freq):
    spec = kv_cache.KVSpec(1, 1, 8, inv_freq=freq)
    cache = hc.HierarchicalKVCache.empty(spec, 1, 32, 8, hc.Hierarchy(1, 8, 2, sinks=0))
    cache = cache.prefill(jnp.asarray(k), jnp.asarray(k), jnp.ones((1, 32), bool))
    by_pos = _view_by_position(cache.attention_view(), 0)
    got = np.stack([by_pos[p][0] for p in range(16)])
    errs[freq is None] = np.linalg.norm(got - k[0, 0, :16]) / np.linalg.norm(k[0, 0, :16])
  assert errs[False] < 1e-5 and errs[True] > 0.05, errs


@pytest.mark.parametrize("window,chunk,rank,batch,buffer", [(2, 128, 4, 1, 0),
                                                          (1, 32, 8, 3, 32)])
def test_cache_bytes_follow_the_layout(window, chunk, rank, batch, buffer):
  """kv_memory's arithmetic (what --mode=plan prints) equals the caches' real arrays."""
  spec = kv_cache.KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=jnp.bfloat16)
  n = 131072
  full = hc.cache_bytes(spec, batch, n, buffer_size=buffer)
  assert full == kv_memory.full_cache_bytes(30, 3, 64, jnp.bfloat16, batch, n, buffer)
  assert full >= 2 * 30 * 3 * 64 * 2 * n * batch
  hy = hc.Hierarchy(window=window, chunk=chunk, rank=rank)
  got = hc.cache_bytes(spec, batch, n, hy, buffer_size=buffer)
  assert got == kv_memory.hierarchical_cache_bytes(30, 3, 64, jnp.bfloat16, batch, n,
                                                   window, chunk, rank, 1, buffer)
  factors = rank * (chunk + 64) / (chunk * 64)
  assert factors < got / full < factors + 0.01


def test_validation_and_commit_width():
  with pytest.raises(ValueError, match="window must be >= 1"):
    hc.Hierarchy(window=0)
  with pytest.raises(ValueError, match="rank must be in"):
    hc.Hierarchy(chunk=4, rank=5)
  with pytest.raises(ValueError, match="sinks must be >= 0"):
    hc.Hierarchy(sinks=-1)
  cache = hc.HierarchicalKVCache.empty(SPEC, 1, 16, 4, hc.Hierarchy(1, 4, 2))
  k = jnp.zeros((2, 1, 5, 2, 6))
  with pytest.raises(ValueError, match="exceeds the kv hierarchy chunk"):
    cache.commit(k, k, jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool))


@pytest.mark.parametrize("field,value,match", [
    ("kv_cache", "ring", "sample.kv_cache must be"),
    ("kv_chunk", 4, "sample.kv_chunk=4 is smaller than one commit"),
    ("kv_rank", 0, "rank must be in"),
    ("kv_window", 0, "window must be >= 1")])
def test_sample_config_fields_are_validated(field, value, match):
  from blockdiff_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import sample  # pylint: disable=g-import-not-at-top
  s = sample.default_sample_config()
  s.kv_cache = "hierarchical"
  s[field] = value
  with pytest.raises(ValueError, match=match):
    sample.options_from_config(s, 8, tokenizers.ByteTokenizer())
  s[field] = sample.default_sample_config()[field]
  if field == "kv_cache":
    s.kv_cache = "hierarchical"
  opt = sample.options_from_config(s, 8, tokenizers.ByteTokenizer())
  assert opt.kv_hierarchy == hc.Hierarchy(window=2, chunk=256, rank=6, sinks=1)


# --- Decoders: with full rank the hierarchical cache decodes exactly like the full one. ---

BLOCK = 8
PROMPTS = ["<|bos|>hello world, this is a longer prompt", "<|bos|>ab",
           "<|bos|>0123456789abcdefghij"]
MAX_NEW = 24
FULL_RANK = hc.Hierarchy(window=1, chunk=8, rank=8)  # head_dim 16 >= chunk: exact.


def _canvas(tok, block):
  ids = [layout.parse(tok, p).ids for p in PROMPTS]
  return layout.generation_canvas(ids, MAX_NEW, block, tok.mask_id, 96)


@pytest.mark.parametrize("sub_block,shift", [(0, False), (4, True)])
def test_block_decoder_full_rank_equals_full_cache(tiny_decoder, sub_block, shift):
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), sub_block_size=sub_block,
                              token_shift=shift, stop_at_eos=False)
  cv = _canvas(tok, BLOCK)
  want = decoder.decode(model, params, cv, opt)
  got = decoder.decode(model, params, cv, opt.__class__(**{**opt.__dict__,
                                                           "kv_hierarchy": FULL_RANK}))
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_array_equal(got["nfe"], want["nfe"])
  assert (want["tokens"] != cv.tokens).any()


def test_ar_and_isd_full_rank_equal_full_cache(tiny_decoder):
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=1, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True, stop_at_eos=False)
  hier = opt.__class__(**{**opt.__dict__, "kv_hierarchy": FULL_RANK})
  cv = _canvas(tok, 1)
  want = ar.decode_ar(model, params, cv, opt)
  np.testing.assert_array_equal(ar.decode_ar(model, params, cv, hier)["tokens"],
                                want["tokens"])
  out = isd.decode_isd(model, params, cv, hier, stride=4)
  np.testing.assert_array_equal(out["tokens"], want["tokens"])  # ISD is lossless too.


def test_low_rank_decoding_differs_and_its_logit_cost_is_measured(tiny_decoder):
  """Rank 1 of 8 changes the next-token distribution; the KL is measured and bounded."""
  model, tok, params = tiny_decoder
  ids = np.asarray(layout.parse(tok, PROMPTS[0] * 2).ids, np.int32)[None]
  n = ids.shape[1]
  fn = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, cache=c, return_kv=True))
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  meta = lambda pos: masks.make_meta(jnp.asarray(pos, jnp.int32)[None], 1, masks.CLEAN)
  _, aux = fn(params, ids[:, :-1], meta(np.arange(n - 1)), None)
  k, v = aux["kv"]
  kls = {}
  for rank in (1, 4, 8):
    cache = hc.HierarchicalKVCache.empty(model_kv_spec(model), 1, n, 1,
                                         hc.Hierarchy(window=1, chunk=8, rank=rank, sinks=0))
    cache = cache.prefill(k, v, jnp.ones((1, n - 1), bool))
    full = kv_cache.KVCache.empty(model_kv_spec(model), 1, n, 1).prefill(
        k, v, jnp.ones((1, n - 1), bool))
    last = meta([n - 1])
    lh = jax.nn.log_softmax(fn(params, ids[:, -1:], last, cache.attention_view())[0][0, -1])
    lf = jax.nn.log_softmax(fn(params, ids[:, -1:], last, full.attention_view())[0][0, -1])
    kls[rank] = float(jnp.sum(jnp.exp(lf) * (lf - lh)))
  assert kls[8] < 1e-6  # Full rank: exact.
  assert kls[1] > kls[4] > kls[8] and kls[1] > 1e-5  # Lower rank, larger KL.


def model_kv_spec(model):
  cfg = model.cfg
  return kv_cache.KVSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


def test_a_ring_wider_than_the_context_keeps_the_full_cache(tiny_decoder):
  """Nothing would leave the ring: the decoder holds the full cache, not ring + bank."""
  model, tok, params = tiny_decoder
  spec = model_kv_spec(model)
  wide = hc.Hierarchy(window=15, chunk=8, rank=2)  # Ring of 128 positions.
  assert isinstance(hc.empty_cache(spec, 2, 96, BLOCK, hierarchy=wide), kv_cache.KVCache)
  assert isinstance(hc.empty_cache(spec, 2, 136, BLOCK, hierarchy=wide),
                    hc.HierarchicalKVCache)
  assert hc.cache_bytes(spec, 2, 96, wide) == hc.cache_bytes(spec, 2, 96)
  assert hc.cache_bytes(spec, 2, 96, wide) == kv_memory.hierarchical_cache_bytes(
      spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype, 2, 96, 15, 8, 2)
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), stop_at_eos=False)
  cv = _canvas(tok, BLOCK)  # 96 positions.
  want = decoder.decode(model, params, cv, opt)
  got = decoder.decode(model, params, cv, opt.__class__(**{**opt.__dict__,
                                                           "kv_hierarchy": wide}))
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
