"""Hardening of the sampling front ends: prompt errors and streamed blocks name their
prompt's own index, and the AR speed-up comparison names the decoder it actually timed.

References: the caller's own prompt indices, the prompts' parsed ids, and the options'
policy class.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BigramLM
from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import speedup

BYTES = tokenizers.ByteTokenizer()


def _bigram():
  """A bigram LM that always continues with 'a' (a constant answer, quick to compile)."""
  table = np.zeros((BYTES.vocab_size,) * 2, np.float32)
  table[:, ord("a")] = 5.0
  return BigramLM(BYTES.mask_id), {"table": jnp.asarray(table)}


def _options(policy=None, token_shift=True):
  return layout.DecodeOptions(block_size=4, mask_id=BYTES.mask_id, eos_id=BYTES.eos_id,
                              token_shift=token_shift,
                              policy=policy or policies.Threshold(0.3))


# --- A bad prompt's error names that prompt, not "prompt 0". ---

def test_answer_errors_name_each_prompts_own_index():
  # Before: answer() checks each prompt alone, so every error read "prompt 0 has ..."
  # (and "text 0 has ..." for infilling), whichever prompt it was.
  fn, params = _bigram()
  prompts = ["<|bos|>ab", "<|bos|>" + "x" * 40, "<|bos|>" + "y" * 50,
             "<|bos|>ab<|mask:2|>" + "z" * 40, ""]
  rows, summary = generation.answer(fn, params, BYTES, prompts,
                                    _options(token_shift=False), 4, 32)
  assert rows[0]["completion"] == "aaaa" and summary["generated_tokens"] == 4
  assert rows[1]["error"].startswith("prompt 1 has 41 tokens; with max_new_tokens=4")
  assert rows[2]["error"].startswith("prompt 2 has 51 tokens")
  assert rows[3]["error"].startswith("prompt 3 has 45 tokens, more than the context of 32")
  assert rows[4]["error"].startswith("prompt 4 is empty")
  assert [r["prompt"] for r in rows] == prompts


def test_compare_with_ar_does_not_call_a_later_prompt_prompt_0(monkeypatch):
  # Before: "prompt 2 ('...'): prompt 0 has 41 tokens; ..." named two prompts.
  calls = []
  monkeypatch.setattr(speedup.generation, "generate", lambda **kw: calls.append(kw))
  prompts = ["<|bos|>a", "<|bos|>b", "<|bos|>" + "x" * 40]
  with pytest.raises(ValueError) as e:
    speedup.compare_with_ar(None, None, BYTES, prompts, _options(), 4, 32,
                            speedup.Decoder("threshold"))
  assert str(e.value).startswith("prompt 2 ('<|bos|>xxx")
  assert "prompt 0" not in str(e.value) and "it has 41 tokens" in str(e.value)
  assert not calls


def test_one_prompt_checks_name_the_prompt_as_the_caller_says():
  # The per-prompt checks behind generation_canvas / infill_canvas, which answer and
  # compare_with_ar call one prompt at a time with the prompt's own name.
  check = lambda ids, name: layout.check_prompt(np.asarray(ids), 4, 9, 8, name)
  with pytest.raises(ValueError, match=r"^prompt 7 is empty"):
    check([], "prompt 7")
  with pytest.raises(ValueError, match=r"^prompt 3 has 5 tokens; .* context of 8"):
    check([1, 2, 3, 4, 5], "prompt 3")
  with pytest.raises(ValueError, match=r"^it contains MASK"):
    check([1, 9], "it")
  check([1, 2, 3, 4], "prompt 0")  # Fits exactly: 4 + 4 = 8.
  with pytest.raises(ValueError, match=r"^prompt 5 has 9 tokens, more than"):
    layout.check_infill_text(layout.Parsed(np.arange(9), np.ones(9, bool), ()), 8, "prompt 5")
  # The batched canvases keep their own "prompt i" / "text i".
  with pytest.raises(ValueError, match=r"^prompt 1 is empty"):
    layout.generation_canvas([np.asarray([1]), np.asarray([], np.int32)], 4, 4, 9, 8)


# --- compare_with_ar reports the decoder it timed. ---

def test_compare_with_ar_refuses_ar_as_the_compared_decoder():
  # Before: Decoder("ar") was accepted; compare_with_ar then timed the block decoder
  # and reported it as "ar: ... 1.1x AR".
  with pytest.raises(ValueError, match=r"policy must be 'isd' or a block policy .*got 'ar'"):
    speedup.Decoder("ar")
  with pytest.raises(ValueError, match=r"got 'treshold'"):
    speedup.Decoder("treshold")


def test_compare_with_ar_refuses_a_label_other_than_the_options_policy(monkeypatch):
  # Before: Decoder("topk") with Threshold options timed Threshold and named it topk.
  calls = []
  monkeypatch.setattr(speedup.generation, "generate", lambda **kw: calls.append(kw))
  with pytest.raises(ValueError, match=r"dec.policy='topk' but options.policy is Threshold"):
    speedup.compare_with_ar(None, None, BYTES, ["<|bos|>a"], _options(), 4, 32,
                            speedup.Decoder("topk"))
  assert not calls


def test_compare_with_ar_runs_when_the_label_matches_the_options():
  fn, params = _bigram()
  rows, summary = speedup.compare_with_ar(
      fn, params, BYTES, ["<|bos|>ab"], _options(policies.make_policy("topk", 2)), 4, 32,
      speedup.Decoder("topk"))
  assert summary["decoder"] == "topk" and summary["identical"]
  assert rows[0]["completion"] == rows[0]["ar_completion"] == "aaaa"
  assert rows[0]["ar_nfe"] == 4  # AR: one token per forward, the prefill's included.


def test_answer_streams_each_block_under_its_prompts_index():
  # Before: the batch held only the accepted prompts, so after a refused prompt 0 the
  # stream of --mode=sample labelled prompt 1's blocks "row 0" and prompt 3's "row 2".
  fn, params = _bigram()
  prompts = ["<|bos|>" + "x" * 40, "<|bos|>abc", "", "<|bos|>q"]
  seen = {}

  def on_block(block_index, tokens, active):
    for row in np.flatnonzero(np.asarray(active)):
      seen.setdefault(int(row), []).append((int(block_index[row]), np.asarray(tokens[row])))

  rows, _ = generation.answer(fn, params, BYTES, prompts, _options(), 6, 32,
                              on_block=on_block)
  assert sorted(seen) == [1, 3]
  for i in (1, 3):
    ids = list(layout.parse(BYTES, prompts[i]).ids) + rows[i]["tokens"]
    first = len(layout.parse(BYTES, prompts[i]).ids) // 4  # The first block decoded.
    blocks = [b for b, _ in seen[i]]
    assert blocks == list(range(first, first + len(blocks)))
    streamed = np.concatenate([t for _, t in seen[i]])
    assert list(streamed[streamed != BYTES.mask_id]) == ids[first * 4:]
