"""Hardening of the ISD trace and the AR comparison (sampling/trace.py, sampling/speedup.py).

The traces must refuse what ``generation.generate`` refuses (they claim to show what it
does), and ``compare_with_ar`` must decode every prompt it was given, whatever iterable
holds them.
"""

import jax.numpy as jnp
import pytest

from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import speedup
from blockdiff_jax.sampling import trace
from test_hardening_isd2 import BYTES, EOS, MASK, TableLM, _fake_generate, _table

PROMPT = "<|bos|>ab"
OTHER_MASK = ord("z")  # A plain byte: to the model, the canvas's "MASK" slots are text.


@pytest.mark.parametrize("decoder", ["isd", "block"])
def test_a_trace_refuses_a_mask_other_than_the_tokenizers(decoder):
  """Before: both traces decoded a canvas of "z" slots (generate refuses the options)."""
  fn, params = TableLM(0, mask_id=MASK), {"table": jnp.asarray(_table())}
  if decoder == "isd":
    opt = layout.DecodeOptions(block_size=1, mask_id=OTHER_MASK, eos_id=EOS, token_shift=True)
    run = lambda: trace.isd_trace(fn, params, BYTES, PROMPT, opt, 3, 6, 64)
  else:
    opt = layout.DecodeOptions(block_size=4, mask_id=OTHER_MASK, eos_id=EOS,
                               policy=policies.Threshold(0.05))
    run = lambda: trace.block_trace(fn, params, BYTES, PROMPT, opt, 6, 64)
  with pytest.raises(ValueError) as want:
    generation.generate(fn, params, BYTES, [PROMPT], opt, 6, 64,
                        isd_stride=3 if decoder == "isd" else 0)
  with pytest.raises(ValueError) as got:
    run()
  assert str(got.value) == str(want.value)
  assert "mask_id=122" in str(got.value)


@pytest.mark.parametrize("make", [lambda p: (x for x in p), lambda p: map(str, p)])
def test_compare_with_ar_decodes_every_prompt_of_any_iterable(monkeypatch, make):
  """Before: a generator was used up by the prompt checks, nothing was decoded and the
  summary divided by a total wall time of 0 (ZeroDivisionError)."""
  calls = []
  fake = _fake_generate({"ar": (12, 1.2), "dec": (3, 0.5)})
  monkeypatch.setattr(speedup.generation, "generate",
                      lambda **kw: calls.append(kw["prompts"]) or fake(**kw))
  opts = layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS)
  lines = []
  rows, summary = speedup.compare_with_ar(None, None, BYTES, make(["p", "q"]), opts, 16, 64,
                                          speedup.Decoder("threshold"), log=lines.append)
  assert [r["prompt"] for r in rows] == ["p", "q"]
  assert calls == [["p"], ["p"], ["q"], ["q"]]  # AR, then the decoder, per prompt.
  assert summary["prompts"] == 2 and summary["generated_tokens"] == 6
  assert summary["speedup"] == pytest.approx((6 / 1.0) / (24 / 2.4))
  assert lines[1].startswith("[2/2] threshold:")


def test_compare_with_ar_refuses_an_empty_one_pass_iterable(monkeypatch):
  """Before: an empty generator is truthy, so it passed the "no prompt" check and the
  summary divided by zero; it now gets the error an empty list gets."""
  monkeypatch.setattr(speedup.generation, "generate", _fake_generate({}))
  opts = layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS)
  with pytest.raises(ValueError, match="needs at least one prompt, got none"):
    speedup.compare_with_ar(None, None, BYTES, (p for p in []), opts, 16, 64,
                            speedup.Decoder("threshold"))
