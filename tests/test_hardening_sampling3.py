"""Hardening of the sampler, third pass: the block trace's prefill buckets, the logits a
token-shifted row's first block never reads, the structured path's alignment check under
jit, and proposals and policies at edge settings.

Each test checks against an independent reference: an exact-width step loop, the same
decode with garbage where the decoder must not look, the dense attention, or numpy.
"""

import dataclasses
from typing import Any

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BigramLM
from conftest import JaxEventCounter
from conftest import LOWERING_EVENT
from blockdiff_jax import masks
from blockdiff_jax.data import tokenizers
from blockdiff_jax.model import summary_attention
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib
from blockdiff_jax.sampling import trace

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

TOK = tokenizers.ByteTokenizer()
MASK, EOS, VOCAB = TOK.mask_id, TOK.eos_id, TOK.vocab_size
BLOCK = 4


def _bigram_table(seed=0):
  table = np.random.default_rng(seed).normal(size=(VOCAB, VOCAB)).astype(np.float32)
  table[:, 256:] = -30.0  # Only bytes are ever likely.
  return table


# --- The block trace prefills at the decoder's bucketed width. ---

_LOWERINGS = JaxEventCounter(LOWERING_EVENT)  # Programs traced to MLIR (jit or eager).


def _exact_width_fills(fn, params, prompt, opt, max_len):
  """(fills, generated ids) of a step loop whose prefill is the exact (unbucketed) width."""
  ids = layout.parse(TOK, prompt).ids
  cv = layout.generation_canvas([ids], max_len - len(ids), BLOCK, MASK, max_len)
  need = state_lib.prefill_width(cv, BLOCK)
  st = jax.jit(lambda p: state_lib.init_state(fn, p, cv, opt, need))(params)
  step = jax.jit(lambda p, s: step_lib.denoise_step(fn, p, s, opt))
  fills, forward = [], 0
  while not np.asarray(st.done)[0]:
    st, info = step(params, st)
    forward += 1
    info = jax.device_get(info)
    for j in np.flatnonzero(info.accepted[0]):
      fills.append((forward, int(info.block[0]) * BLOCK + j - len(ids), int(info.tokens[0, j]),
                    float(info.confidence[0, j])))
  gen = np.asarray(st.tokens)[0, len(ids):max_len]
  return fills, gen


def test_block_trace_compiles_once_per_prefill_bucket_and_decodes_as_the_exact_width():
  # Before: every call traced its step anew and ran the prefill eagerly at the exact
  # width (a small Transformer: 160-220 programs lowered per prompt, 7-17 s each).
  fn, params = BigramLM(MASK), {"table": jnp.asarray(_bigram_table())}
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.Threshold(0.05), stop_at_eos=False)
  max_len = 32  # max_new_tokens above it: every canvas is max_len wide.
  prompts = ["<|bos|>" + "ab" * 3, "<|bos|>" + "x" * 9, "<|bos|>" + "q" * 12,
             "<|bos|>" + "z" * 20]  # Exact prefill widths 4, 8, 12 (bucket 16), 20.
  traces, programs = [], []
  _LOWERINGS.active = True
  try:
    for p in prompts:
      _LOWERINGS.count = 0
      traces.append(trace.block_trace(fn, params, TOK, p, opt, 100, max_len))
      programs.append(_LOWERINGS.count)
  finally:
    _LOWERINGS.active = False
  # The first prompt builds the prefill and step programs; the next two share them; the
  # last needs only a prefill for its bucket (20).
  assert programs[1:] == [0, 0, 1], programs
  for p, t in zip(prompts, traces):
    fills, gen = _exact_width_fills(fn, params, p, opt, max_len)
    got = [(f["forward"], f["position"], f["token"]) for f in t["fills"]]
    assert got == [f[:3] for f in fills], p
    np.testing.assert_allclose([f["confidence"] for f in t["fills"]], [f[3] for f in fills],
                               rtol=1e-5, atol=1e-6)
    hits = np.flatnonzero(gen == EOS)
    assert t["completion"] == TOK.decode(gen[:hits[0] if hits.size else len(gen)])
    assert t["forwards"] == fills[-1][0] and len(fills) == len(gen)  # Each slot filled once.


# --- A token-shifted row's first block never reads the logits of an invalid slot. ---

@dataclasses.dataclass(frozen=True)
class _NanWhereInvalid:
  """A logits function whose logits are NaN at every slot with a negative segment."""

  inner: Any

  @property
  def kv_spec(self):
    return self.inner.kv_spec

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    logits, kv, stats = self.inner(params, tokens, meta, cache, logits_slice)
    seg = meta.segment_ids
    if logits_slice is not None:
      seg = seg[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    return jnp.where((seg < 0)[..., None], jnp.nan, logits), kv, stats


SHIFT_VARIANTS = {
    "plain": {},
    "sub_block_editing_sampling": {"sub_block_size": 2, "edit_threshold": 0.3,
                                   "sampling": policies.Sampling(temperature=1.0, top_p=0.9)},
}


@pytest.mark.parametrize("variant", list(SHIFT_VARIANTS))
def test_token_shift_first_block_does_not_depend_on_invalid_slots(variant):
  # Row 0 (2 tokens) starts at block 0: its block's first slot is a prompt token, and the
  # logits "predicting" it come from prefill slot 0, invalid for that row (NaN here).
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS, token_shift=True,
                             policy=policies.Threshold(0.3), stop_at_eos=False,
                             **SHIFT_VARIANTS[variant])
  rng = np.random.default_rng(1)
  ids = [np.concatenate([[TOK.bos_id], rng.integers(97, 123, n - 1)]).astype(np.int32)
         for n in (2, 7, 10)]
  cv = layout.generation_canvas(ids, 10, BLOCK, MASK, 32, 32)
  params = {"table": jnp.asarray(_bigram_table())}
  clean, poisoned = BigramLM(MASK), _NanWhereInvalid(BigramLM(MASK))
  st = state_lib.init_state(poisoned, params, cv, opt)
  assert np.isnan(np.asarray(st.head[0])).all() and np.isfinite(np.asarray(st.head[1:])).all()
  want = decoder.decode(clean, params, cv, opt)
  got = decoder.decode(poisoned, params, cv, opt)
  for name in ("tokens", "nfe", "steps", "edits"):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for row, p in enumerate(ids):  # Every row decoded its 10 tokens.
    assert (want["tokens"][row, len(p):len(p) + 10] != MASK).all()
  if variant == "plain":  # Alone, row 0 has no prefill at all (its head is zeros).
    alone = decoder.decode(clean, params, layout.generation_canvas(ids[:1], 10, BLOCK, MASK,
                                                                   32, 32), opt)
    np.testing.assert_array_equal(alone["tokens"][0], want["tokens"][0])


# --- The structured summary path names a misaligned row under jit (via checkify). ---

def test_structured_path_misalignment_is_reported_by_checkify_under_jit():
  b, length, slots = 2, 16, 1
  pos = jnp.arange(length)[None] + jnp.asarray([8, 2])[:, None]  # Row 1: inside a block.
  noisy = masks.make_meta(pos, BLOCK, masks.NOISY)
  clean = masks.make_meta(pos, BLOCK, masks.CLEAN)
  meta = noisy.concat(clean).concat(masks.summary_slots_meta(clean, BLOCK, slots))
  total = meta.shape[-1]
  q, k, v = (jax.random.normal(jax.random.key(i), (b, total, h, 4))
             for i, h in enumerate((2, 1, 1)))
  lay, spec = masks.SummaryLayout(2, BLOCK, slots), masks.MaskSpec(window_blocks=2)
  fn = lambda q, k, v, m: summary_attention.structured_attention(q, k, v, m, lay, spec)
  checked = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))
  err, out = checked(q, k, v, meta)
  with pytest.raises(checkify.JaxRuntimeError, match=r"metadata row 1 does not follow"):
    err.throw()
  assert np.isfinite(np.asarray(out[0])).all() and np.isnan(np.asarray(out[1])).all()
  aligned = masks.TokenMeta(*(jnp.concatenate([x[:1], x[:1]]) for x in
                              dataclasses.astuple(meta)))
  err, out = checked(q, k, v, aligned)
  assert err.get() is None and np.isfinite(np.asarray(out)).all()
  # Without checkify the check compiles to nothing: no host callback on the hot path.
  hlo = jax.jit(fn).lower(q, k, v, meta).as_text()
  assert "custom_call" not in hlo and "callback" not in hlo


# --- Proposals and policies at edge settings, against numpy. ---

def _numpy_filtered_probs(logits, temperature, top_k, top_p):
  """float64 reference of temperature, top-k (ties kept) and top-p, then softmax."""
  x = logits.astype(np.float64)
  x = x - np.max(np.where(np.isfinite(x), x, -np.inf), -1, keepdims=True)
  x = x / temperature
  if top_k:
    kth = -np.sort(-x, -1)[..., min(top_k, x.shape[-1]) - 1:][..., :1]
    x = np.where(x < kth, -np.inf, x)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if top_p < 1:
    order = np.argsort(-p, -1, kind="stable")
    ps = np.take_along_axis(p, order, -1)
    keep_sorted = np.cumsum(ps, -1) - ps < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, -1)
    p = np.where(keep, p, 0.0)
    p /= p.sum(-1, keepdims=True)
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1e-6, 0, 1.0), (2e-38, 0, 1.0), (2e-38, 0, 0.9),  # Tiny: the argmax, probability 1.
    (1.0, 0, 1e-9),  # Tiny top-p: only the top token.
    (0.7, VOCAB + 5, 1.0), (1.3, 3, 0.5), (1.0, 0, 1.0)])
def test_proposals_match_numpy_at_edge_settings(temperature, top_k, top_p):
  # Before: at temperature 2e-38 the scaled logits overflowed to inf, the softmax was NaN
  # and no token matched the argmax.
  rng = np.random.default_rng(2)
  logits = (rng.normal(size=(3, 5, 40)) * 12).astype(np.float32)
  logits[..., 7] = -np.inf  # A model that masks vocab entries.
  logits[0, :, 9:12] = logits[0, :, 3:4]  # Ties with the top token of some rows.
  s = policies.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  toks, conf, probs = s.propose(jnp.asarray(logits), jax.random.key(3))
  want = _numpy_filtered_probs(logits, temperature, top_k, top_p)
  toks = np.asarray(toks)
  np.testing.assert_allclose(np.asarray(probs), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(conf), np.take_along_axis(want, toks[..., None],
                                                                  -1)[..., 0], atol=1e-5)
  assert (np.take_along_axis(want, toks[..., None], -1) > 0).all()
  if temperature < 1e-3:
    top = logits.max(-1, keepdims=True)
    assert np.take_along_axis(logits, toks[..., None], -1).ravel().tolist() == \
        top.ravel().tolist()


def test_greedy_with_masked_vocab_entries_matches_numpy():
  logits = np.random.default_rng(4).normal(size=(2, 6, 30)).astype(np.float32)
  logits[..., ::3] = -np.inf
  toks, conf, _ = policies.Sampling().propose(jnp.asarray(logits), jax.random.key(0))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(conf), p.max(-1), rtol=1e-5)


def test_a_subnormal_temperature_is_refused_naming_the_value():
  with pytest.raises(ValueError, match=r"sample.temperature must be 0 .* got 1e-40"):
    policies.Sampling(temperature=1e-40)  # Flushed to 0 by XLA: a division by zero.
  assert policies.Sampling(temperature=float(np.finfo(np.float32).tiny)).temperature > 0


def _numpy_best(score, cand):
  """Index of the best candidate: highest score, NaN lowest, ties to the leftmost."""
  idx = np.flatnonzero(cand)
  finite = [j for j in idx if not np.isnan(score[j])]
  if not finite:
    return int(idx[0])
  top = max(score[j] for j in finite)
  return int(min(j for j in finite if score[j] == top))


NAN_POLICIES = [policies.Threshold(0.9), policies.Threshold(1.0), policies.Factor(1.0),
                policies.Margin(0.9), policies.EntropyBounded(0.0), policies.TopK(8)]


@pytest.mark.parametrize("policy", NAN_POLICIES, ids=[repr(p) for p in NAN_POLICIES])
def test_every_policy_accepts_a_candidate_when_confidences_are_nan_or_low(policy):
  # Before: a NaN confidence ranked below the non-candidates, so the "at least one"
  # rule picked a non-candidate and the step accepted nothing.
  rng = np.random.default_rng(5)
  conf = rng.uniform(0.0, 0.5, size=(6, 8)).astype(np.float32)
  conf[0, :] = np.nan  # Every confidence NaN (NaN or +inf logits).
  conf[1, ::2] = np.nan
  conf[2, 3] = conf[2, 5]  # A tie among low confidences.
  cand = rng.random((6, 8)) < 0.5
  cand[:, 0] = True
  cand[5] = False  # No candidates: nothing accepted.
  entropy, margin = 1.0 - conf, conf  # Low confidence: high entropy, low margin.
  acc = np.asarray(policy.select(jnp.asarray(conf), jnp.asarray(entropy), jnp.asarray(margin),
                                 jnp.asarray(cand), jnp.asarray(cand.sum(-1, keepdims=True))))
  assert not (acc & ~cand).any()
  assert (acc.any(-1) == cand.any(-1)).all()
  # Nothing passes any rule here (TopK: k = 1), so each row accepts only its best.
  score = {policies.Margin: margin, policies.EntropyBounded: -entropy}.get(type(policy), conf)
  for r in range(5):
    assert np.flatnonzero(acc[r]).tolist() == [_numpy_best(score[r], cand[r])], r


def test_decoder_fills_a_mask_every_step_when_a_model_forces_tokens():
  # A model with +inf logits (a forced token) gives NaN confidences: before, Threshold
  # then accepted nothing until the step cap (block fills 3, 3, 3, 4: 16 forwards, not 12).
  table = _bigram_table()
  table[np.arange(VOCAB) % 3 == 0, ord("A")] = np.inf
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.Threshold(0.9), stop_at_eos=False)
  cv = layout.generation_canvas([layout.parse(TOK, "<|bos|>hi").ids], 12, BLOCK, MASK, 32, 32)
  filled = []
  out = decoder.decode(BigramLM(MASK), {"table": jnp.asarray(table)}, cv, opt,
                       on_step=lambda b, t: filled.append((int(b[0]),
                                                          int((np.asarray(t) != MASK).sum()))))
  for (b0, n0), (b1, n1) in zip(filled, filled[1:]):
    assert b1 != b0 or n1 > n0, filled  # Within a block, every step fills a MASK.
  gen = out["tokens"][0, 3:15]
  assert (gen != MASK).all() and ord("A") in gen
