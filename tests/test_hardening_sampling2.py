"""Hardening of the decoders, second pass: compiles per prompt length, top-k ties, the
threshold-1 order, edits in the block trace and the sampling key of infilled prompts.

Each test checks a decoder against an independent reference: a numpy loop over a bigram
table, a cacheless forward of the model, Hugging Face's logits warper or numpy ranks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import trace
from conftest import BigramLM
from conftest import slow_block_ar

TOK = tokenizers.ByteTokenizer()
MASK, EOS, VOCAB = TOK.mask_id, TOK.eos_id, TOK.vocab_size


def _bigram_table(seed=0):
  table = np.random.default_rng(seed).normal(size=(VOCAB, VOCAB)).astype(np.float32)
  table[:, 256:] = -30.0  # Only bytes are ever likely.
  table[ord("e"), EOS] = 50.0  # After "e" comes EOS.
  return table


def _bigram_greedy(table, ids, max_new):
  """The slow loop: a bigram's greedy continuation, up to and including EOS."""
  out = list(ids)
  for _ in range(max_new):
    logits = table[out[-1]].copy()
    logits[MASK] = -np.inf
    out.append(int(np.argmax(logits)))
    if out[-1] == EOS:
      break
  return out[len(ids):]


def _reference_bucket(n, limit):
  """Smallest of {16} and m * 2**e (m in 4..7) that is >= n, by enumeration."""
  members = sorted({16} | {m << e for m in range(4, 8) for e in range(2, 24)})
  return min(next(x for x in members if x >= n), limit)


def test_bucket_is_the_next_of_four_widths_per_octave():
  for n in range(0, 2100):
    assert jit_cache.bucket(n, 4096) == _reference_bucket(n, 4096), n
  assert jit_cache.bucket(70, 72) == 72  # Capped at the canvas width.
  with pytest.raises(ValueError, match="n=9 must be in"):
    jit_cache.bucket(9, 8)


@pytest.mark.parametrize("decoder", ["ar", "isd"])
def test_ar_and_isd_compile_once_per_prompt_bucket_with_unchanged_outputs(decoder):
  """The jit key held the longest prompt's exact length: 19 lengths, 19 programs."""
  table = _bigram_table()
  params = {"table": jnp.asarray(table)}
  opt = layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS, token_shift=True)
  cache = ar.JIT_CACHE if decoder == "ar" else isd.JIT_CACHE
  cache.clear()
  kw = {"ar": True} if decoder == "ar" else {"isd_stride": 3}
  lengths = range(1, 20)
  for n in lengths:
    prompts = ["<|bos|>" + "abcdfghij"[:1 + n % 9] * (1 + n // 9), "<|bos|>" + "x" * n]
    rows, _ = generation.generate(BigramLM(MASK), params, TOK, prompts, opt, 6, 64, width=64,
                                  **kw)
    for p, row in zip(prompts, rows):
      want = _bigram_greedy(table, layout.parse(TOK, p).ids, 6)
      assert row["tokens"] == want, (n, p)
      assert row["generated_tokens"] == len(want)
  assert len(cache) == 2  # Longest prompts of 2..20 tokens: prefills 16 and 20 wide.


def test_bucketed_ar_prefill_of_a_transformer_matches_a_cacheless_forward(tiny_decoder):
  """Rows of 5, 9 and 13 tokens share a prefill 16 wide: the padding slots stay hidden."""
  model, tok, params = tiny_decoder
  block = 8
  opt = layout.DecodeOptions(block_size=block, mask_id=tok.mask_id, eos_id=tok.eos_id,
                             stop_at_eos=False)
  prompts = ["<|bos|>sort", "<|bos|>add: 1+2", "<|bos|>copy: abcdef"]
  ids = [layout.parse(tok, p).ids for p in prompts]
  assert [len(i) for i in ids] == [5, 9, 13]
  rows, _ = generation.generate(model, params, tok, prompts, opt, 6, 32, width=32, ar=True)
  for p, i, row in zip(prompts, ids, rows):
    assert row["tokens"] == slow_block_ar(model, params, i, 6, block, tok.mask_id,
                                         32).tolist(), p


def test_top_k_keeps_ties_at_the_kth_logit_as_hugging_face_does():
  """Decided: ties with the k-th value survive (more than k tokens), as in transformers'
  ``TopKLogitsWarper``; ``lax.top_k`` alone would keep exactly k, by token id."""
  x = np.random.default_rng(0).integers(-3, 4, (64, 24)).astype(np.float32)  # Many ties.
  for k in (1, 2, 5, 24):
    got = np.asarray(policies.Sampling(1.0, top_k=k).filter_logits(jnp.asarray(x))) > -1e29
    want = x >= np.sort(x, axis=-1)[:, -k][:, None]
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
    hf = logits_process.TopKLogitsWarper(k)(None, torch.tensor(x)).numpy() > -np.inf
    np.testing.assert_array_equal(got, hf, err_msg=f"k={k}")
    assert k == x.shape[-1] or (want.sum(-1) > k).any()  # The case in question occurs.


def test_threshold_one_fills_the_most_confident_position_not_the_leftmost():
  """As documented: one token per step in confidence order (ties to the leftmost)."""
  conf = np.random.default_rng(1).choice([0.2, 0.5, 0.9], (32, 8)).astype(np.float32)
  cand = np.random.default_rng(2).random((32, 8)) < 0.7
  cand[:, 3] = True
  zero = jnp.zeros(conf.shape)
  got = np.asarray(policies.Threshold(1.0).select(jnp.asarray(conf), zero, zero,
                                                  jnp.asarray(cand), jnp.full((32, 1), 8)))
  want = np.zeros_like(cand)
  want[np.arange(32), np.argmax(np.where(cand, conf, -1.0), axis=-1)] = True  # First max.
  np.testing.assert_array_equal(got, want)
  l2r = np.asarray(policies.LeftToRight().select(jnp.asarray(conf), zero, zero,
                                                 jnp.asarray(cand), None))
  assert (l2r != got).any()


A, B = ord("a"), ord("b")
_AFTER_MASK = np.full(VOCAB, -8.0, np.float32)
_AFTER_MASK[A], _AFTER_MASK[B] = 0.0, -0.5  # "a", p ~ 0.59.
_AFTER_REAL = np.full(VOCAB, -8.0, np.float32)
_AFTER_REAL[B] = 3.0  # "b", p ~ 0.996.


@dataclasses.dataclass(frozen=True)
class NeighbourLM:
  """Each slot of the forward predicts "a" after a MASK slot, "b" after a real token.

  Filling a whole block at once writes "a" behind MASKs; the next step, with editing,
  rewrites them to "b".
  """

  kv_spec = kv_cache.KVSpec(num_layers=1, num_kv_heads=1, head_dim=1)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    left = jnp.pad(tokens, ((0, 0), (1, 0)), constant_values=0)[:, :-1]
    logits = jnp.where((left == MASK)[..., None], jnp.asarray(_AFTER_MASK),
                       jnp.asarray(_AFTER_REAL))
    if logits_slice is not None:
      logits = logits[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    zeros = jnp.zeros((1,) + tokens.shape + (1, 1), jnp.float32)
    return logits, (zeros, zeros), {}


def test_block_trace_records_the_edits_that_rewrite_written_tokens():
  """The trace kept each position's first write ("a") though editing rewrote it ("b")."""
  opt = layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS, policy=policies.TopK(1),
                             edit_threshold=0.9, stop_at_eos=False)
  prompt = "<|bos|>xyz"
  (row,), _ = generation.generate(NeighbourLM(), {}, TOK, [prompt], opt, 8, 64)
  t = trace.block_trace(NeighbourLM(), {}, TOK, prompt, opt, 8, 64)
  assert t["forwards"] == row["nfe"] and t["completion"] == row["completion"] == "b" * 8
  final = {}
  for f in t["fills"]:  # Replayed in order, the writes give the decoder's text.
    final[f["position"]] = f["token"]
  assert [final[p] for p in range(8)] == row["tokens"]
  edits = [f for f in t["fills"] if f["kind"] == "edit"]
  assert sorted(f["position"] for f in edits) == [1, 2, 3, 5, 6, 7]
  real = np.delete(_AFTER_REAL, MASK)  # The decoder never proposes MASK.
  p_b = np.exp(_AFTER_REAL[B]) / np.exp(real).sum()
  for f in edits:
    assert f["token"] == B and f["confidence"] == pytest.approx(p_b, rel=1e-5)
    first = next(g for g in t["fills"] if g["position"] == f["position"])
    assert first["kind"] == "fill" and first["token"] == A and first["forward"] < f["forward"]


def test_infilled_prompts_are_sampled_with_the_given_key():
  """``answer`` passed its key to the continued prompts only: infilling sampled with key
  0 whatever the seed."""
  params = {"table": jnp.asarray(_bigram_table())}
  opt = layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS,
                             sampling=policies.Sampling(1.0))
  prompts = ["<|bos|>ab<|mask:12|>cd", "<|bos|>xy"]
  spans, continued = [], []
  for seed in (0, 1, 2, 1):
    rows, _ = generation.answer(BigramLM(MASK), params, TOK, prompts, opt, 8, 64,
                                rng=jax.random.key(seed))
    spans.append(tuple(rows[0]["tokens"][3:15]))
    continued.append(tuple(rows[1]["tokens"]))
    assert rows[0]["tokens"][:3] == list(layout.parse(TOK, "<|bos|>ab").ids)
  assert spans[1] == spans[3] and len(set(spans)) == 3  # Reproducible, and seed-dependent.
  assert len(set(continued)) == 3
  # The infilled and continued prompts do not share their draws.
  assert all(s[:6] != c[:6] for s, c in zip(spans, continued))
  direct = generation.infill(BigramLM(MASK), params, TOK, prompts[:1], opt, 64,
                             rng=jax.random.key(1))
  assert direct[0]["spans"] != generation.infill(BigramLM(MASK), params, TOK, prompts[:1], opt,
                                                 64, rng=jax.random.key(2))[0]["spans"]
