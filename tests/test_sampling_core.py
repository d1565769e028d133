"""The decoder's parts driven by a fake logits function, against a slow Python loop.

The fake is a two-layer mean-free "transformer" in exact integer arithmetic (sums of
small integers, reduced mod small primes), so a cached computation and a recomputation
agree bit for bit and any difference in what a token attends to shows up in the logits.
Its second layer's K/V depend on context, so the Fast-dLLM sub-block buffer (K/V of the
block from the sub-block's first step) is distinguishable from a fresh recomputation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib

VOCAB, MASK, EOS, BOS = 16, 15, 14, 13
BLOCK, WIDTH = 8, 40


@dataclasses.dataclass(frozen=True)
class FakeLM:
  """Two exact integer attention layers; K = V = the layer's input."""

  kv_spec = kv_cache.KVSpec(num_layers=2, num_kv_heads=1, head_dim=4)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    h = params["emb"][tokens]
    keys, kv, x = meta, [], h
    if cache is not None:
      keys = cache["meta"].concat(meta)
    attend = masks.dense_mask(meta, keys).astype(jnp.float32)
    for layer in range(2):
      kv.append(x)
      vals = x if cache is None else jnp.concatenate([cache["k"][layer, :, :, 0], x], 1)
      x = h + jnp.mod(jnp.einsum("bqk,bkd->bqd", attend, vals), 5 + 2 * layer)
    logits = 0.35 * jnp.einsum("btd,dv->btv", x, params["out"])
    if logits_slice is not None:
      logits = logits[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    k = jnp.stack(kv)[:, :, :, None]
    return logits, (k, k), {}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"emb": jnp.asarray(rng.integers(-2, 3, (VOCAB, 4)), jnp.float32),
          "out": jnp.asarray(rng.integers(-1, 2, (4, VOCAB)), jnp.float32)}


def _canvas(prompts=((BOS, 3, 4), (BOS,) + (5,) * 10, (BOS, 1) * 6), max_new=20):
  return layout.generation_canvas([np.asarray(p, np.int32) for p in prompts], max_new, BLOCK,
                                  MASK, WIDTH, WIDTH)


def _infill_canvas():
  rows = []
  for n, span in ((3, 4), (11, 6), (17, 9)):
    ids = np.array([BOS] + [1 + i % 12 for i in range(30)], np.int32)
    maskable = np.zeros(len(ids), bool)
    maskable[n:n + span] = True
    ids[maskable] = MASK
    rows.append(layout.Parsed(ids, maskable, ()))
  return layout.infill_canvas(rows, BLOCK, WIDTH, WIDTH)


def _meta(pos, stream, valid):
  return state_lib.token_meta(jnp.asarray(pos, jnp.int32)[None], BLOCK,
                              jnp.asarray(stream, jnp.int32)[None], jnp.asarray(valid)[None])


def _reference(fn, params, opt, tokens, maskable, length, start):
  """One row, no persistent cache: every step recomputes the whole prefix."""
  fn = jax.jit(fn)
  toks, nfe = tokens.copy(), 0
  sb = opt.sub
  for c in range(start, len(toks) // BLOCK):
    lo = c * BLOCK
    if lo >= length or not maskable[lo:].any():
      break
    pos = np.arange(lo + BLOCK)
    exists = pos < length
    region_blk = maskable[lo:lo + BLOCK] & exists[lo:]
    stream = np.where(pos < lo, masks.CLEAN, masks.NOISY)
    worked = False
    for s in range(opt.num_sub):
      region = region_blk.copy()
      region[:s * sb] = False
      region[(s + 1) * sb:] = False
      if opt.num_sub > 1 and not (toks[lo:lo + BLOCK][region] == MASK).any():
        continue  # The decoder skips sub-blocks with nothing to fill.
      worked, step, still = True, 0, 0
      while True:
        if step == 0 or opt.num_sub == 1:
          logits, (k, _), _ = fn(params, jnp.asarray(toks[:lo + BLOCK])[None],
                                 _meta(pos, stream, exists))
          snapshot = k
          block_logits = logits[:, lo:]
        else:  # Sub-block step: the rest of the block from the sub-block's first step.
          cur = np.zeros(lo + BLOCK, bool)
          cur[lo + s * sb:lo + (s + 1) * sb] = True
          cache = {"k": snapshot, "meta": _meta(pos, stream, exists & ~cur)}
          sub_logits, _, _ = fn(params, jnp.asarray(toks[:lo + BLOCK][cur])[None],
                                _meta(pos[cur], masks.NOISY, exists[cur]), cache)
          block_logits = jnp.zeros((1, BLOCK, VOCAB)).at[:, s * sb:(s + 1) * sb].set(sub_logits)
        nfe += 1
        sel = step_lib.select_tokens(opt, jnp.asarray(toks[lo:lo + BLOCK])[None], block_logits,
                                     jnp.asarray(region)[None], jax.random.key(0),
                                     jnp.int32(step), jnp.ones((1,), bool))
        new = np.asarray(sel.tokens[0])
        still = 0 if (new != toks[lo:lo + BLOCK]).any() else still + 1
        toks[lo:lo + BLOCK] = new
        step += 1
        left = region & (new == MASK)
        done = not left.any() and (still >= opt.patience or not opt.editing)
        # An EOS with no MASK before it fixes the answer: the row stops (sub-blocks too).
        eos_first = (opt.stop_at_eos and not opt.editing
                     and (region & (new == EOS) & (np.cumsum(left) - left == 0)).any())
        if done or eos_first or step >= opt.step_cap:
          break
      if eos_first:
        break
    if not worked:
      nfe += 1  # The block's first forward still commits the previous block.
    if opt.stop_at_eos and (toks[lo:lo + BLOCK][region_blk] == EOS).any():
      break
  return toks, nfe


CASES = {
    "threshold": dict(policy=policies.Threshold(0.5)),
    "factor": dict(policy=policies.Factor(1.0)),
    "topk": dict(policy=policies.TopK(3)),
    "l2r": dict(policy=policies.LeftToRight()),
    "editing": dict(policy=policies.Threshold(0.5), edit_threshold=0.6, patience=2),
    "no_eos_stop": dict(policy=policies.Threshold(0.5), stop_at_eos=False),
    "step_cap": dict(policy=policies.Threshold(0.9), max_steps_per_block=3),
    "sub4": dict(policy=policies.Threshold(0.5), sub_block_size=4),
    "sub2_editing": dict(policy=policies.Threshold(0.5), sub_block_size=2,
                         edit_threshold=0.6),
    "sub4_step_cap": dict(policy=policies.Threshold(0.9), sub_block_size=4,
                          max_steps_per_block=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("infill", [False, True])
def test_decoder_equals_slow_reference(case, infill):
  kw = dict(CASES[case])
  if infill:
    kw["stop_at_eos"] = False
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS, **kw)
  fn, params = FakeLM(), _params()
  cv = _infill_canvas() if infill else _canvas()
  out = decoder.decode(fn, params, cv, opt)
  for i in range(cv.tokens.shape[0]):
    ref, nfe = _reference(fn, params, opt, cv.tokens[i], cv.maskable[i], int(cv.length[i]),
                          int(cv.start_block[i]))
    np.testing.assert_array_equal(out["tokens"][i], ref, err_msg=f"row {i}")
    assert out["nfe"][i] == nfe, f"row {i}"
  # Rows never wait for each other, sub-blocks included.
  assert out["forwards"] == out["nfe"].max()
  assert not (out["tokens"][cv.maskable] == MASK).all()


@pytest.mark.parametrize("sub_block,seed", [(4, 10), (2, 16), (4, 17)])
def test_sub_block_rows_stop_at_an_eos_with_nothing_masked_before_it(sub_block, seed):
  """Fast-dLLM v2's rule: once the answer ends, later sub-blocks are never decoded."""
  kw = dict(block_size=BLOCK, mask_id=MASK, eos_id=EOS, policy=policies.Threshold(0.5),
            sub_block_size=sub_block)
  opt = layout.DecodeOptions(**kw)
  fn, params, cv = FakeLM(), _params(seed), _canvas()
  out = decoder.decode(fn, params, cv, opt)
  full = decoder.decode(fn, params, cv, layout.DecodeOptions(**kw, stop_at_eos=False))
  stopped = 0
  for i in range(cv.tokens.shape[0]):
    ref, nfe = _reference(fn, params, opt, cv.tokens[i], cv.maskable[i], int(cv.length[i]),
                          int(cv.start_block[i]))
    np.testing.assert_array_equal(out["tokens"][i], ref, err_msg=f"row {i}")
    assert out["nfe"][i] == nfe, f"row {i}"
    toks = out["tokens"][i]
    first_eos = int(np.argmax(toks == EOS))
    assert toks[first_eos] == EOS and not (toks[:first_eos] == MASK).any()
    # Up to the first EOS the answer is the one decoding every sub-block gives.
    np.testing.assert_array_equal(toks[:first_eos + 1], full["tokens"][i][:first_eos + 1])
    if (toks[cv.maskable[i]] == MASK).any():  # It stopped with sub-blocks left undecoded.
      stopped += 1
      assert out["nfe"][i] < full["nfe"][i]
  assert stopped  # The rule fired in this case.


def test_parallel_acceptance_happened():
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.Threshold(0.5), stop_at_eos=False)
  out = decoder.decode(FakeLM(), _params(), _canvas(), opt)
  assert out["nfe"].min() < 20 and len(set(out["nfe"].tolist())) > 1


@pytest.mark.parametrize("sub_block", [0, 4])
def test_denoise_step_by_step_equals_decode(sub_block):
  """The public step function, called from Python, reproduces the jitted loop."""
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.Threshold(0.5), sub_block_size=sub_block)
  fn, params, cv = FakeLM(), _params(), _canvas()
  out = decoder.decode(fn, params, cv, opt)
  st = decoder.init_state(fn, params, cv, opt)
  step = jax.jit(decoder.denoise_step, static_argnums=(0, 3))
  filled = 0
  while not bool(st.done.all()):
    st, info = step(fn, params, st, opt)
    assert bool(jnp.all(info.accepted <= info.active[:, None]))
    filled += int(info.accepted.sum())
  np.testing.assert_array_equal(st.tokens, out["tokens"])
  np.testing.assert_array_equal(st.counters.nfe, out["nfe"])
  assert filled >= int((out["tokens"] != cv.tokens).sum())


def test_on_step_and_on_block_stream_every_step_and_block():
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.Threshold(0.5), sub_block_size=4)
  cv = _canvas()
  frames, blocks = [], {}

  def on_block(block_index, tokens, active):
    for row in np.flatnonzero(np.asarray(active)):
      blocks.setdefault(int(row), []).append((int(block_index[row]), np.asarray(tokens[row])))

  out = decoder.decode(FakeLM(), _params(), cv, opt, on_block=on_block,
                       on_step=lambda b, t: frames.append((np.asarray(b), np.asarray(t))))
  assert len(frames) == out["forwards"]
  for row, got in blocks.items():
    idx = [c for c, _ in got]
    assert idx == list(range(int(cv.start_block[row]), idx[-1] + 1))
    for c, toks in got:
      np.testing.assert_array_equal(toks, out["tokens"][row, c * BLOCK:(c + 1) * BLOCK])
    last = [t[row] for b, t in frames if b[row] == idx[-1]][-1]
    np.testing.assert_array_equal(last, got[-1][1])
  assert sorted(blocks) == [0, 1, 2]


def test_cache_prefill_and_commit_equal_recomputation():
  lm, params = FakeLM(), _params()
  fn = jax.jit(lm)
  rng = np.random.default_rng(1)
  toks = jnp.asarray(rng.integers(0, 13, (2, 4 * BLOCK)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(4 * BLOCK), (2, 4 * BLOCK))
  length = jnp.array([4 * BLOCK, 3 * BLOCK - 2])
  exists = pos < length[:, None]
  _, (k_ref, v_ref), _ = fn(params, toks, state_lib.token_meta(pos, BLOCK, masks.CLEAN,
                                                              exists))
  cache = kv_cache.KVCache.empty(lm.kv_spec, 2, 4 * BLOCK, BLOCK, buffer_size=BLOCK)
  n = 2 * BLOCK
  _, (k, v), _ = fn(params, toks[:, :n],
                    state_lib.token_meta(pos[:, :n], BLOCK, masks.CLEAN, exists[:, :n]))
  cache = cache.prefill(k, v, exists[:, :n])
  # Commit block 2 for row 0, then for row 1 (whose block is partly past its end); a
  # row left out keeps its slots.
  for rows in ([True, False], [False, True]):
    blk = slice(n, n + BLOCK)
    _, (k, v), _ = fn(params, toks[:, blk],
                      state_lib.token_meta(pos[:, blk], BLOCK, masks.CLEAN, exists[:, blk]),
                      cache.attention_view())
    cache = cache.commit(k, v, jnp.full((2,), n), jnp.array(rows), exists)
    if rows == [True, False]:
      assert not cache.valid[1, n:].any() and cache.valid[0, n:n + BLOCK].all()
  valid = np.asarray(cache.valid)
  np.testing.assert_array_equal(valid, np.asarray(exists & (pos < 3 * BLOCK)))
  for got, ref in ((cache.k, k_ref), (cache.v, v_ref)):
    got, ref = np.asarray(got[:, :, :4 * BLOCK]), np.asarray(ref)
    np.testing.assert_array_equal(got[:, valid], ref[:, valid])
  # The buffer holds a block's noisy K/V at its positions; the view marks it NOISY.
  _, (k, v), _ = fn(params, toks[:, 3 * BLOCK:],
                    state_lib.token_meta(pos[:, 3 * BLOCK:], BLOCK, masks.NOISY,
                                         exists[:, 3 * BLOCK:]), cache.attention_view())
  cache = cache.write_buffer(k, v, jnp.full((2,), 3 * BLOCK), jnp.array([True, False]))
  np.testing.assert_array_equal(cache.k[:, 0, 4 * BLOCK:], k[:, 0])
  assert not np.asarray(cache.k[:, 1, 4 * BLOCK:]).any()
  view = cache.attention_view(jnp.ones((2, BLOCK), bool))
  assert view["meta"].shape == (2, 5 * BLOCK)
  np.testing.assert_array_equal(view["meta"].positions[0, 4 * BLOCK:], np.arange(24, 32))
  np.testing.assert_array_equal(view["meta"].stream[:, 4 * BLOCK:], masks.NOISY)
  np.testing.assert_array_equal(view["meta"].segment_ids[:, :4 * BLOCK] >= 0, valid)


def test_jit_cache_is_bounded_and_keyed_on_static_arguments():
  cache = jit_cache.JitCache(maxsize=2)
  built = []
  build = lambda k: built.append(k) or (lambda: k)
  for key in ("a", "b", "a", "c", "b"):
    assert cache.get(key, build)() == key
  assert len(cache) == 2 and built == ["a", "b", "c", "b"]  # "b" was evicted by "c".
  assert "a" not in cache and "c" in cache
  with pytest.raises(ValueError, match="maxsize"):
    jit_cache.JitCache(0)
  # The decoder's cache: one entry per static setting; a new callback adds none.
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS)
  fn, params, cv = FakeLM(), _params(), _canvas()
  decoder.JIT_CACHE.clear()
  decoder.decode(fn, params, cv, opt)
  seen = []
  for _ in range(2):
    decoder.decode(fn, params, cv, opt, on_block=lambda i, t, a: seen.append(int(a.sum())))
  assert len(decoder.JIT_CACHE) == 2 and sum(seen) > 0
  decoder.decode(fn, params, cv, dataclasses.replace(opt, policy=policies.Threshold(0.3)))
  assert len(decoder.JIT_CACHE) == 3 <= decoder.JIT_CACHE.maxsize
