"""Hardening of the AR and ISD decoders (and the distill data they make): each test pins a
case where a decoder's output parted from an independent slow reference, or where an input
the decoder cannot serve gave silent garbage instead of an error."""

import dataclasses
import io

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax.data import sft
from blockdiff_jax.model import build
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import distill
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import layout
from conftest import BigramLM
from conftest import slow_block_ar

EOS, MASK, VOCAB = 10, 11, 12


def _near_tie_table():
  """After t the best two next tokens are one float32 ulp apart, the larger at the higher id."""
  table = np.full((VOCAB, VOCAB), -5.0, np.float32)
  lo = np.float32(0.1)
  hi = np.nextafter(lo, np.float32(1.0))  # exp(lo - hi) rounds to 1: equal probabilities.
  for t in range(VOCAB):
    a, b = sorted([(t + 1) % 10, (t + 3) % 10])
    table[t, a], table[t, b] = lo, hi
  return table


def _options(**kw):
  return layout.DecodeOptions(**{"block_size": 1, "mask_id": MASK, "eos_id": EOS,
                                 "token_shift": True, **kw})


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_greedy_isd_equals_greedy_ar_when_the_top_logits_nearly_tie(stride):
  """Greedy is the argmax of the logits; ISD took it of their softmax, which ties them."""
  table = _near_tie_table()
  prompts, max_new = [(1, 2), (5,), (0, 9, 4)], 9
  cv = layout.generation_canvas([np.asarray(p, np.int32) for p in prompts], max_new, 1, MASK,
                                64)
  params = {"table": jnp.asarray(table)}
  got = isd.decode_isd(BigramLM(MASK), params, cv, _options(stop_at_eos=False), stride)
  for i, p in enumerate(prompts):
    want = list(p)  # The slow loop: a bigram's greedy continuation.
    for _ in range(max_new):
      want.append(int(np.argmax(table[want[-1]])))
    np.testing.assert_array_equal(got["tokens"][i, :len(want)], want, err_msg=f"row {i}")
  np.testing.assert_array_equal(
      ar.decode_ar(BigramLM(MASK), params, cv, _options(stop_at_eos=False))["tokens"],
      got["tokens"])


def test_a_token_shifted_ar_or_isd_refuses_an_empty_prompt():
  """With the shift, a row's first token is read from the slot before it: there is none.

  Before, the row silently took the logits of another row's prompt slot.
  """
  cv = layout.generation_canvas([np.array([1, 2, 3], np.int32), np.array([4], np.int32)], 4,
                                1, MASK, 16, 8)
  tokens, maskable = cv.tokens.copy(), cv.maskable.copy()
  tokens[1, 0], maskable[1, 0], maskable[1, 5] = MASK, True, False  # Row 1: no prompt.
  empty = layout.Canvas(tokens, maskable, cv.length, np.array([3, 0], np.int32))
  params = {"table": jnp.asarray(_near_tie_table())}
  with pytest.raises(ValueError, match="row 1: .*prompt cannot be empty"):
    ar.decode_ar(BigramLM(MASK), params, empty, _options())
  with pytest.raises(ValueError, match="row 1: .*prompt cannot be empty"):
    isd.decode_isd(BigramLM(MASK), params, empty, _options(), 3)
  # Without the shift an empty prompt is unconditional generation, as before.
  out = ar.decode_ar(BigramLM(MASK), params, empty, _options(token_shift=False))
  assert (out["tokens"][1, :5] != MASK).all()


def test_ar_and_isd_refuse_a_summary_token_model():
  """They give every token its own block; the summary window counts blocks, so the prompt
  fell out of view: two different prompts got the same continuation."""
  c = small_model_config()
  c.diffusion.block_size = 8
  c.model.summary.num_slots = 2
  c.model.summary.window_blocks = 1
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  prompts = [np.arange(3, 24, dtype=np.int32), np.arange(40, 61, dtype=np.int32)]
  cv = layout.generation_canvas(prompts, 4, 1, tok.mask_id, 32)
  opt = layout.DecodeOptions(block_size=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                             stop_at_eos=False)
  with pytest.raises(ValueError, match="summary tokens.*block decoder"):
    ar.decode_ar(model, params, cv, opt)
  with pytest.raises(ValueError, match="summary tokens.*block decoder"):
    isd.decode_isd(model, params, cv, dataclasses.replace(opt, token_shift=True), 2)


def test_distilled_answers_of_a_block_model_keep_its_prompt_blocks():
  """Without the token shift the AR decoder needs the model's block size for the prompt's
  block-causal attention; ``distill`` decoded with blocks of one token."""
  c = small_model_config()
  block = c.diffusion.block_size
  assert block > 1 and not c.diffusion.get("token_shift", False)
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  questions = ["What is the capital of France?", "Name a prime number larger than ten."]
  max_new, max_len = 10, 96
  got = distill.greedy_answers(model, params, tok, questions, max_new, max_len, 3,
                               token_shift=False, log=io.StringIO(), block_size=block)
  for q, answer, _ in got:
    head = sft.render(tok, (q, ""))[0]
    want = slow_block_ar(model, params, head, max_new, block, tok.mask_id, max_len,
                         eos_id=tok.eos_id)
    text = tok.decode(want[want != tok.eos_id])
    # A cut answer may drop trailing U+FFFD (a split character; tests/test_distill2.py).
    assert answer.rstrip("\ufffd") == text.rstrip("\ufffd") and text.startswith(answer), q
