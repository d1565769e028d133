"""Block decoding of a token-shifted model against a slow no-cache reference (tiny MoE)."""

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib

BLOCK = 8
WIDTH = 48
MAX_LEN = 64
# 18, 3 and 16 tokens: two prompts end mid-block, one exactly at a block boundary (the
# first token of its first block is then predicted by the prefill's last token).
PROMPTS = ["<|bos|>hello world, this", "<|bos|>ab", "<|bos|>0123456789abcde"]
MAX_NEW = 20


def _meta(pos, stream, valid):
  pos = jnp.asarray(pos, jnp.int32)[None]
  return masks.make_meta(pos, BLOCK, stream, jnp.where(jnp.asarray(valid)[None], 0, -1))


def _policy_step(opt, x, logits, region, step):
  logits = jnp.asarray(logits).at[..., opt.mask_id].set(-1e30)
  toks, conf, probs = opt.sampling.propose(logits[None], jax.random.key(0))
  entropy, margin = policies.scores(probs)
  cand = (jnp.asarray(x) == opt.mask_id)[None] & jnp.asarray(region)[None]
  slots = jnp.sum(jnp.asarray(region))[None, None]
  accept = opt.policy.select(conf, entropy, margin, cand, slots)
  if step + 1 >= opt.step_cap:
    accept = cand
  return np.where(np.asarray(accept)[0], np.asarray(toks)[0], x)


@functools.lru_cache(maxsize=None)
def _jit_apply(model):
  """model.apply compiled once per shape (block), not dispatched op by op every step."""
  return jax.jit(model.apply, static_argnames="return_kv")


def _reference_decode(model, params, opt, tokens, maskable, length, start):
  """One row, no persistent cache, token shift from its definition.

  Token i of block c is predicted from the output at i-1: for the block's first token
  a clean forward over tokens[:lo] (its last output), otherwise the noisy block's
  output at i-1 in a forward over (clean prefix ; noisy block). With sub-blocks, the
  block's K/V outside the sub-block (and the slot before it) come from the sub-block's
  first step, as in Fast-dLLM v2's sub-block cache.
  """
  toks = tokens.copy()
  jitted = _jit_apply(model)  # Shared by every row: each shape compiles once.
  apply = lambda *a, **k: jitted({"params": params}, *a, return_kv=True, **k)
  sb = opt.sub
  for c in range(start, len(toks) // BLOCK):
    lo = c * BLOCK
    if lo >= length or not maskable[lo:].any():
      break
    pos = np.arange(lo + BLOCK)
    exists = pos < length
    if lo:
      head, _ = apply(jnp.asarray(toks[:lo])[None], _meta(pos[:lo], masks.CLEAN, exists[:lo]))
      head = np.asarray(head[0, lo - 1])
    else:  # Block 0 starts with the prompt's first token, which is never predicted.
      assert not maskable[0]
      head = np.zeros(model.cfg.vocab_size, np.float32)
    for s in range(opt.num_sub):
      region = np.zeros(BLOCK, bool)
      region[s * sb:(s + 1) * sb] = True
      region &= maskable[lo:lo + BLOCK] & exists[lo:]
      step = 0
      while (toks[lo:lo + BLOCK][region] == opt.mask_id).any() and step < opt.step_cap:
        inp = jnp.asarray(toks[:lo + BLOCK])[None]
        meta = _meta(pos[:lo], masks.CLEAN, exists[:lo]).concat(
            _meta(pos[lo:], masks.NOISY, exists[lo:]))
        logits, aux = apply(inp, meta)
        if step == 0 or opt.num_sub == 1:
          snapshot = aux["kv"]
          out = np.asarray(logits[0, lo:])
        else:
          win = np.zeros(lo + BLOCK, bool)
          win[max(lo + s * sb - 1, lo):lo + (s + 1) * sb] = True
          stream = np.where(pos < lo, masks.CLEAN, masks.NOISY)
          cache_meta = masks.make_meta(jnp.asarray(pos)[None], BLOCK, jnp.asarray(stream)[None],
                                       jnp.where(jnp.asarray(exists & ~win)[None], 0, -1))
          wpos = pos[win]
          wl, _ = apply(jnp.asarray(toks[:lo + BLOCK][win])[None],
                        _meta(wpos, masks.NOISY, wpos < length),
                        cache={"k": snapshot[0], "v": snapshot[1], "meta": cache_meta})
          out = np.zeros((BLOCK,) + wl.shape[2:], np.float32)
          out[wpos - lo] = np.asarray(wl[0])
        shifted = np.concatenate([head[None], out[:-1]], axis=0)
        toks[lo:lo + BLOCK] = _policy_step(opt, toks[lo:lo + BLOCK], shifted, region, step)
        step += 1
    if opt.stop_at_eos and (toks[lo:lo + BLOCK][maskable[lo:lo + BLOCK]] == opt.eos_id).any():
      break
  return toks


@pytest.mark.parametrize("sub_block", [0, 4])
def test_shifted_cached_decoding_equals_reference(tiny_decoder, sub_block):
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), sub_block_size=sub_block,
                              token_shift=True)
  ids = [layout.parse(tok, p).ids for p in PROMPTS]
  cv = layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, MAX_LEN, WIDTH)
  assert int(cv.start_block[2]) * BLOCK == 16 and cv.maskable[2, 16]
  out = decoder.decode(model, params, cv, opt, prefill_width=16)
  for i in range(len(PROMPTS)):
    want = _reference_decode(model, params, opt, cv.tokens[i], cv.maskable[i],
                             int(cv.length[i]), int(cv.start_block[i]))
    np.testing.assert_array_equal(out["tokens"][i], want)
  # Something was generated, and the unshifted decoder decodes differently.
  assert (out["tokens"] != cv.tokens).any()
  plain = decoder.decode(model, params, cv,
                         decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id,
                                               eos_id=tok.eos_id, sub_block_size=sub_block,
                                               policy=policies.Threshold(0.05)),
                         prefill_width=16)
  assert (plain["tokens"] != out["tokens"]).any()


@pytest.mark.parametrize("sub_block", [0, 4])
def test_shifted_decoding_of_prompts_inside_the_first_block(tiny_decoder, sub_block):
  """Every prompt shorter than a block: nothing is prefilled and block 0's first token
  (a prompt token) has no prediction. This path used to fail to trace."""
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), sub_block_size=sub_block,
                              token_shift=True)
  prompts = ["<|bos|>ab", "<|bos|>hey"]
  ids = [layout.parse(tok, p).ids for p in prompts]
  cv = layout.generation_canvas(ids, 12, BLOCK, tok.mask_id, MAX_LEN, 24)
  assert (cv.start_block == 0).all()
  out = decoder.decode(model, params, cv, opt)
  for i in range(len(prompts)):
    want = _reference_decode(model, params, opt, cv.tokens[i], cv.maskable[i],
                             int(cv.length[i]), 0)
    np.testing.assert_array_equal(out["tokens"][i], want)
  assert (out["tokens"] != cv.tokens).any()


def _greedy_causal_lm(model, params, ids, max_new, eos_id, mask_id):
  """Slow AR reference: a full causal forward per token (every token its own block).

  The tokens sit at the front of a MAX_LEN-wide row, so every forward has one shape
  (one compile); the slots after the last token hold 0s that no earlier position sees.
  """
  toks, n = np.zeros((MAX_LEN,), np.int32), len(ids)
  toks[:n] = ids
  meta = masks.make_meta(jnp.arange(MAX_LEN, dtype=jnp.int32)[None], 1, masks.CLEAN)
  apply = _jit_apply(model)
  for _ in range(max_new):
    logits, _ = apply({"params": params}, jnp.asarray(toks)[None], meta)
    toks[n] = int(jnp.argmax(logits[0, n - 1].at[mask_id].set(-jnp.inf)))
    n += 1
    if toks[n - 1] == eos_id:
      break
  return [int(t) for t in toks[len(ids):n]]


@pytest.mark.parametrize("sub_block,dual", [(0, False), (4, False), (0, True)])
def test_causal_blocks_decoded_left_to_right_are_the_causal_lm(sub_block, dual):
  """With diffusion.block_attention=causal, one token per forward from the left through
  the block cache (and the sub-block and dual caches, exact here since no position sees
  the MASKs after it) is greedy AR decoding of the same weights."""
  model, tok, params = _causal_block_model()
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.LeftToRight(), sub_block_size=sub_block,
                              dual_cache=dual, token_shift=True)
  ids = [layout.parse(tok, p).ids for p in PROMPTS]
  cv = layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, MAX_LEN, WIDTH)
  out = decoder.decode(model, params, cv, opt, prefill_width=16)
  for i, row in enumerate(ids):
    want = _greedy_causal_lm(model, params, row, MAX_NEW, tok.eos_id, tok.mask_id)
    got = out["tokens"][i, len(row):len(row) + len(want)]
    np.testing.assert_array_equal(got, want)
    assert len(want) > 1


@pytest.mark.parametrize("stride", [2, 4])
def test_isd_of_a_causal_block_model_is_its_causal_lm(stride):
  """A Fast-dLLM model with causal blocks is a token-shifted causal LM whose MASK slots
  learned to propose later tokens, so I-DLM's strided decoding applies to it unchanged:
  its greedy text is the causal LM's (and so the left-to-right block decoder's above)."""
  model, tok, params = _causal_block_model()
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True)
  ids = [layout.parse(tok, p).ids for p in PROMPTS]
  cv = layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, MAX_LEN, WIDTH)
  out = isd.decode_isd(model, params, cv, opt, stride)
  for i, row in enumerate(ids):
    want = _greedy_causal_lm(model, params, row, MAX_NEW, tok.eos_id, tok.mask_id)
    np.testing.assert_array_equal(out["tokens"][i, len(row):len(row) + len(want)], want)
    assert 1 <= out["nfe"][i] <= len(want)  # At least one token per forward.


@functools.lru_cache(maxsize=None)
def _causal_block_model():
  """A dense token-shifted model built with diffusion.block_attention=causal (seed 3)."""
  c = small_model_config()
  c.model.moe.num_experts = 0  # Block routing would let a token see its block's future.
  c.diffusion.block_size = BLOCK
  c.diffusion.block_attention = "causal"
  model, tok = build.build_model(c)
  return model, tok, build.init_params(model, 3)


def test_a_masked_first_slot_is_refused_under_token_shift(tiny_decoder):
  """Slot 0 has no output before it: an infill span there used to decode as token 0."""
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True)
  cv = layout.infill_canvas([layout.parse(tok, "<|mask:3|>hello")], BLOCK, MAX_LEN)
  with pytest.raises(ValueError, match="slot 0 has nothing to predict it"):
    decoder.decode(model, params, cv, opt)
  cv = layout.infill_canvas([layout.parse(tok, "<|bos|><|mask:3|>hello")], BLOCK, MAX_LEN)
  out = decoder.decode(model, params, cv, opt)  # A token before the span: decodes.
  assert (out["tokens"][0, 1:4] != tok.mask_id).all()


def _exact_confidence(model, params, opt, toks, lo, length):
  """Confidence of every position of block lo.. from uncached forwards (token shift)."""
  pos = np.arange(lo + BLOCK)
  exists = pos < length
  logits, _ = _jit_apply(model)({"params": params}, jnp.asarray(toks[:lo + BLOCK])[None],
                                _meta(pos[:lo], masks.CLEAN, exists[:lo]).concat(
                                    _meta(pos[lo:], masks.NOISY, exists[lo:])))
  out = np.asarray(logits[0, lo - 1:lo + BLOCK - 1])  # Row 0 = the clean token before lo.
  out = jnp.asarray(out).at[..., opt.mask_id].set(-1e30)
  return np.asarray(jax.nn.softmax(out, axis=-1).max(-1))


@pytest.mark.parametrize("sub_block,dual,bound", [
    (0, False, 1e-5),   # Whole blocks: exact.
    (4, False, 0.05),   # Sub-block cache: other sub-blocks' K/V from the sub-block start.
    (4, True, 0.1),     # Dual cache: refreshed only at the block start.
])
def test_cache_error_of_the_confidences_is_measured(tiny_decoder, sub_block, dual, bound):
  """Max |confidence(cached) - confidence(exact)| over the positions each step filled.

  Measured on the tiny random model (threshold 0.05, one prompt, blocks of 8):
  whole blocks 4.5e-8 (exact up to float rounding); sub-block cache (sub-blocks of 4)
  8.6e-3; dual cache 2.4e-2 in probability (its K/V are staler).
  """
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), sub_block_size=sub_block,
                              token_shift=True, dual_cache=dual)
  ids = [layout.parse(tok, p).ids for p in PROMPTS[:1]]
  cv = layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, MAX_LEN, WIDTH)
  fn = logits_lib.from_model(model)
  st = state_lib.init_state(fn, params, cv, opt, 16)
  step = jax.jit(lambda p, s: step_lib.denoise_step(fn, p, s, opt))
  errors = []
  while not bool(st.rows.done.all()):
    before = np.asarray(st.tokens[0])
    lo = int(st.rows.block[0]) * BLOCK
    st, info = step(params, st)
    acc = np.asarray(info.accepted[0])
    if acc.any():
      want = _exact_confidence(model, params, opt, before, lo, int(cv.length[0]))
      errors.append(np.abs(np.asarray(info.confidence[0]) - want)[acc].max())
  err = float(np.max(errors))
  print(f"sub_block={sub_block} dual={dual}: max confidence error {err:.2e} "
        f"over {len(errors)} steps")
  assert err < bound
  if sub_block:
    assert err > 1e-6  # Approximate: the test would notice an accidental exact path.


_WIDTHS: dict = {}  # Forward input widths seen, per recording logits function.


@dataclasses.dataclass(frozen=True)
class _RecordingLogits:
  """A model's logits function that notes the width of every forward it runs."""

  model: Any
  name: str

  @property
  def kv_spec(self):
    return logits_lib.from_model(self.model).kv_spec

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None, **kw):
    width = tokens.shape[1]  # Static; the callback runs only in the branch taken.
    jax.debug.callback(lambda: _WIDTHS[self.name].append(width))
    return logits_lib.from_model(self.model)(params, tokens, meta, cache, logits_slice, **kw)


def _step_by_step(fn, params, cv, opt):
  """Every step's (tokens, accepted, confidence) and the final state."""
  st = state_lib.init_state(fn, params, cv, opt, 24)
  step = jax.jit(lambda p, s: step_lib.denoise_step(fn, p, s, opt))
  trace = []
  while not bool(st.rows.done.all()):
    st, info = step(params, st)
    trace.append(jax.device_get((st.tokens, info.accepted, info.confidence)))
  return trace, st


# Three of the five (shift, sub-block, dual) combinations, for the suite's time: shift with
# whole blocks, shift with sub-blocks and the dual cache (sub-block windows, block
# refreshes), no shift with sub-blocks. The two left out run the same window shapes.
@pytest.mark.parametrize("shift,sub_block,dual", [
    (True, 0, False), (True, 2, True), (False, 2, False)])
def test_narrow_windows_decode_exactly_as_the_commit_window(tiny_decoder, shift, sub_block, dual):
  """Narrow forwards (current block, sub-block) give the commit window's steps.

  Step by step: the same tokens, and the same confidence at every filled position.
  Batch 1 takes every window shape; batch 3 mixes rows at different phases, where a
  step runs the widest shape any row needs.
  """
  model, tok, params = tiny_decoder
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.3), sub_block_size=sub_block,
                              token_shift=shift, dual_cache=dual)
  wide = dataclasses.replace(opt, narrow_window=False)
  for prompts in (PROMPTS[:1], PROMPTS):
    ids = [layout.parse(tok, p).ids for p in prompts]
    cv = layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, MAX_LEN, WIDTH)
    name = f"{shift}-{sub_block}-{dual}-{len(prompts)}"
    _WIDTHS[name] = []
    got, st = _step_by_step(_RecordingLogits(model, name), params, cv, opt)
    want, _ = _step_by_step(logits_lib.from_model(model), params, cv, wide)
    jax.effects_barrier()
    assert len(got) == len(want)
    filled = 0
    for (tokens, acc, conf), (w_tokens, w_acc, w_conf) in zip(got, want):
      np.testing.assert_array_equal(tokens, w_tokens)
      np.testing.assert_array_equal(acc, w_acc)
      np.testing.assert_allclose(conf[acc], w_conf[acc], rtol=1e-5, atol=1e-7)
      filled += int(acc.sum())
    assert filled >= MAX_NEW
    widths = collections.Counter(_WIDTHS[name])
    assert widths.pop(24) == 1  # The prefill.
    assert sum(widths.values()) == int(st.counters.forwards), widths
    assert set(widths) <= {2 * BLOCK, BLOCK, sub_block + shift}, widths
    if len(prompts) == 1:
      # At batch 1 every shape runs: commits, block refreshes, sub-block steps.
      want_widths = {2 * BLOCK, BLOCK} | ({sub_block + shift} if sub_block else set())
      assert set(widths) == want_widths, widths
      if sub_block:  # The narrowest shape is the most common one.
        assert widths[sub_block + shift] == max(widths.values()), widths
