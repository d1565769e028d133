"""The block decoder's bucketed prefill width: fewer programs, the same decoding.

``decoder.decode`` without a ``prefill_width`` rounds the widest prompt's block offset up
to a bucket; each test checks it against the exact (unbucketed) width, passed
explicitly, or against a numpy reference of the bucket set and of the prefilled slots.
Also: ``generation.generate`` refuses ``ar`` together with ``isd_stride``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax.data import tokenizers
from blockdiff_jax.model import build
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import state as state_lib
from conftest import BigramLM

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

TOK = tokenizers.ByteTokenizer()
MASK, EOS, VOCAB = TOK.mask_id, TOK.eos_id, TOK.vocab_size
BLOCK = 4
WIDTH = 32
MAX_NEW = 12
# Prompt lengths of a batch: rows start at different blocks (some mid-block), and the
# widest offset (8, 12, 4) is below the bucket (16), so the bucketed prefill covers
# blocks that every row still decodes.
MIXES = [(2, 5, 9), (13, 6, 2), (4, 4, 4)]


def _reference_width(need, block, width):
  """Smallest of {16} and m * 2**e (m in 4..7) >= need, then a block multiple, capped."""
  if need == 0:
    return 0
  members = sorted({16} | {m << e for m in range(4, 8) for e in range(2, 24)})
  w = next(x for x in members if x >= need)
  return min(-(-w // block) * block, width)


def _bigram_params():
  table = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32)
  table[:, 256:] = -30.0  # Only bytes are ever likely.
  return {"table": jnp.asarray(table)}


_MODELS = {}


def _model(summary_slots):
  """A tiny random model with blocks of ``BLOCK`` (with summary slots, window 1)."""
  if summary_slots not in _MODELS:
    c = small_model_config()
    c.diffusion.block_size = BLOCK
    if summary_slots:
      c.model.summary.num_slots = summary_slots
      c.model.summary.window_blocks = 1
    model, tok = build.build_model(c)
    _MODELS[summary_slots] = model, tok, build.init_params(model, 0)
  return _MODELS[summary_slots]


def _canvas(tok, lengths, seed=0):
  rng = np.random.default_rng(seed)
  ids = [np.concatenate([[tok.bos_id], rng.integers(3, 200, n - 1)]).astype(np.int32)
         for n in lengths]
  return layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, WIDTH, WIDTH)


def _options(tok, **kw):
  # tau 0.05 accepts several tokens per step, so the fill order follows the exact logits.
  return decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                               policy=policies.Threshold(0.05), stop_at_eos=False, **kw)


def test_bucketed_width_is_the_next_bucket_as_a_block_multiple():
  for block, width in [(1, 200), (4, 64), (8, 128), (12, 96), (64, 256)]:
    for need in range(0, width + 1, block):
      assert decoder.bucketed_prefill_width(need, block, width) == _reference_width(
          need, block, width), (block, width, need)
  with pytest.raises(ValueError, match="need=6"):
    decoder.bucketed_prefill_width(6, 4, 32)
  with pytest.raises(ValueError, match="need=36"):
    decoder.bucketed_prefill_width(36, 4, 32)


def test_fewer_programs_over_prompt_lengths_with_unchanged_outputs():
  params, opt = _bigram_params(), _options(TOK)
  decoder.JIT_CACHE.clear()
  needs, outs = set(), []
  for n in range(1, 20):  # Prompts of 2..20 tokens.
    ids = [layout.parse(TOK, "<|bos|>" + "ab"[n % 2] * n).ids]
    cv = layout.generation_canvas(ids, 8, BLOCK, MASK, 64, 64)
    needs.add(decoder.prefill_width(cv, BLOCK))
    outs.append((cv, decoder.decode(BigramLM(MASK), params, cv, opt)))
  programs = len(decoder.JIT_CACHE)
  assert programs == len({_reference_width(n, BLOCK, 64) for n in needs})
  assert programs < len(needs)
  for cv, got in outs:  # The exact width (the unbucketed decoder) gives the same results.
    want = decoder.decode(BigramLM(MASK), params, cv, opt,
                          prefill_width=decoder.prefill_width(cv, BLOCK))
    for name in ("tokens", "nfe", "steps", "forwards"):
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


VARIANTS = {
    "plain": {},
    "sub_block": {"sub_block_size": 2},
    "dual_cache": {"sub_block_size": 2, "dual_cache": True},
    "token_shift": {"token_shift": True},
    "hierarchy": {"kv_hierarchy": hc.Hierarchy(window=1, chunk=4, rank=2, sinks=1)},
    "summary": {},
}


# Every mix with the plain decoder, one mix each for the others (compiles are the cost;
# the hierarchical cache's prefill is checked slot by slot below).
CASES = [("plain", m) for m in MIXES] + [
    (v, MIXES[i % len(MIXES)]) for i, v in enumerate(
        ["sub_block", "dual_cache", "token_shift", "summary"], start=1)]


@pytest.mark.parametrize("variant,mix", CASES,
                         ids=[f"{v}-{'-'.join(map(str, m))}" for v, m in CASES])
def test_bucketed_prefill_decodes_as_the_exact_width(variant, mix):
  model, tok, params = _model(2 if variant == "summary" else 0)
  opt = _options(tok, **VARIANTS[variant])
  cv = _canvas(tok, mix)
  need = decoder.prefill_width(cv, BLOCK)
  assert decoder.bucketed_prefill_width(need, BLOCK, WIDTH) > need  # Really wider.
  got = decoder.decode(model, params, cv, opt)
  want = decoder.decode(model, params, cv, opt, prefill_width=need)
  for name in ("tokens", "nfe", "steps", "forwards", "edits"):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert got["prefill_passes"] == want["prefill_passes"] == 1
  assert (got["tokens"] != cv.tokens).any()  # It decoded something.


def _visible(cache, row):
  """{position: keys [L, H, D]} of the slots attention may read in ``row`` of ``cache``."""
  view = hc.dense_view(cache.attention_view())
  seg = np.asarray(view["meta"].segment_ids[row])
  pos = np.asarray(view["meta"].positions[row])
  return {int(pos[j]): np.asarray(view["k"][:, row, j]) for j in np.nonzero(seg >= 0)[0]}


@pytest.mark.parametrize("variant", ["plain", "hierarchy", "summary"])
def test_wider_prefill_commits_only_each_rows_prompt_blocks(variant):
  model, tok, params = _model(2 if variant == "summary" else 0)
  fn = logits_lib.as_logits_fn(model)
  opt = _options(tok, **VARIANTS[variant])
  cv = _canvas(tok, (13, 6, 2))
  need = decoder.prefill_width(cv, BLOCK)
  init = jax.jit(lambda p, w: state_lib.init_state(fn, p, cv, opt, w), static_argnums=1)
  exact, wide = init(params, need), init(params, WIDTH)  # The widest possible prefill.
  start, length = cv.start_block[:, None], cv.length[:, None]
  np.testing.assert_array_equal(np.asarray(wide.rows.block), cv.start_block)
  np.testing.assert_array_equal(np.asarray(wide.rows.done), np.asarray(exact.rows.done))
  np.testing.assert_array_equal(np.asarray(wide.tokens), cv.tokens)
  for row in range(len(cv.length)):
    # Attention sees exactly the row's prompt blocks, with the exact width's keys.
    prompt = [p for p in range(WIDTH) if p < start[row, 0] * BLOCK and p < length[row, 0]]
    got, want = _visible(wide.cache, row), _visible(exact.cache, row)
    assert sorted(got) == sorted(want) == prompt, row
    for p in prompt:
      np.testing.assert_allclose(got[p], want[p], atol=1e-5, err_msg=str((row, p)))
  if variant == "summary":
    slots = model.cfg.summary.num_slots
    committed = np.repeat(np.arange(WIDTH // BLOCK)[None] < start, slots, axis=1)
    np.testing.assert_array_equal(np.asarray(wide.summaries.valid), committed)
    np.testing.assert_array_equal(np.asarray(exact.summaries.valid), committed)
    keep = committed[None, :, :, None, None]
    for name in ("k", "v"):
      np.testing.assert_allclose(np.where(keep, getattr(wide.summaries, name), 0),
                                 np.where(keep, getattr(exact.summaries, name), 0),
                                 atol=1e-5)
    np.testing.assert_array_equal(np.where(committed, wide.summaries.positions, 0),
                                  np.where(committed, exact.summaries.positions, 0))


@pytest.mark.parametrize("call", ["generate", "answer"])
def test_ar_and_isd_together_are_refused(call):
  opt = _options(TOK, token_shift=True)
  fn = generation.generate if call == "generate" else generation.answer
  with pytest.raises(ValueError, match=r"ar=True and isd_stride=2"):
    fn(BigramLM(MASK), _bigram_params(), TOK, ["<|bos|>abc"], opt, 8, 32, ar=True,
       isd_stride=2)
  # Each alone still runs, and they are different decoders (ISD counts narrow forwards).
  _, ar_only = generation.generate(BigramLM(MASK), _bigram_params(), TOK, ["<|bos|>abc"], opt,
                                   8, 32, ar=True)
  _, isd_only = generation.generate(BigramLM(MASK), _bigram_params(), TOK, ["<|bos|>abc"], opt,
                                    8, 32, isd_stride=2)
  assert ar_only["narrow_forwards"] == 0 < isd_only["narrow_forwards"]
