"""Decoder traces (sampling/trace.py) replay exactly what the jitted decoders do."""

import pytest

from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import trace

PROMPTS = ("<|bos|>sort: 3 1 2<|sep|>",)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("sub_block_size", [0, 4])
def test_block_trace_matches_the_decoder(tiny_decoder, prompt, sub_block_size):
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), sub_block_size=sub_block_size)
  t = trace.block_trace(model, params, tok, prompt, opts, 16, 64)
  (row,), _ = generation.generate(model, params, tok, [prompt], opts, 16, 64)
  assert t["completion"] == row["completion"] and t["forwards"] == row["nfe"]
  positions = [f["position"] for f in t["fills"]]
  assert len(positions) == len(set(positions))  # Each slot is filled once (no editing).
  assert set(range(len(row["tokens"]))) <= set(positions)  # Every kept token was a fill.
  assert all(0.0 <= f["confidence"] <= 1.0 for f in t["fills"])


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("stride", [2, 4])
def test_isd_trace_matches_the_decoder(tiny_decoder, prompt, stride):
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True)
  t = trace.isd_trace(model, params, tok, prompt, opts, stride, 16, 64)
  (row,), _ = generation.generate(model, params, tok, [prompt], opts, 16, 64,
                                  isd_stride=stride)
  assert t["completion"] == row["completion"]
  assert len(t["forwards"]) == row["nfe"]
  assert sum(len(f["emitted"]) for f in t["forwards"]) == row["generated_tokens"]
  for f in t["forwards"]:
    assert f["accepted"] <= len(f["verified"]) and len(f["drafts_next"]) == stride - 1
    assert len(f["emitted"]) <= f["accepted"] + 1  # Accepted drafts and one more.
