"""Hardening of the step cap with sub-blocks, warm-up streaming and CRLF prompts files.

``max_steps_per_block`` is a per-block budget split over the sub-blocks, so a block takes
exactly that many steps when every sub-block needs them all (not the floor of an even
split, nor one per sub-block when the cap is smaller than their count: that is refused);
``generate(warmup=True)`` streams each block once; a prompts file saved with CRLF line
ends gives the prompts an LF file gives; ``compare_ar`` with sampling is refused by the
config check, before a checkpoint loads. References: hand-derived step counts, a run
without warm-up, the same file with LF line ends.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BigramLM
from blockdiff_jax import config as config_lib
from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample

BYTES = tokenizers.ByteTokenizer()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "<|bos|>abcdefg"  # 8 tokens: one whole prompt block of 8.


def _bigram():
  """A bigram LM over the letters a-z only (no EOS), so every slot gets filled."""
  table = np.full((BYTES.vocab_size,) * 2, -30.0, np.float32)
  letters = np.arange(ord("a"), ord("z") + 1)
  table[:, letters] = np.random.default_rng(0).normal(size=(BYTES.vocab_size, 26))
  return BigramLM(BYTES.mask_id), {"table": jnp.asarray(table)}


def _options(**kw):
  return layout.DecodeOptions(block_size=8, mask_id=BYTES.mask_id, eos_id=BYTES.eos_id,
                              token_shift=True, stop_at_eos=False, **kw)


# --- max_steps_per_block with sub-blocks: the block takes the steps asked. ---

@pytest.mark.parametrize("cap", [5, 7, 12])
def test_max_steps_per_block_is_the_blocks_step_count_with_sub_blocks(cap):
  # Before: each of the 4 sub-blocks got cap // 4 steps, so caps 5-7 all gave 4 steps.
  fn, params = _bigram()
  # tau = 1 fills one token per step: each 2-token sub-block needs 2 steps, a block 8,
  # so a cap below 8 is what binds (its last step fills what is left).
  opt = _options(policy=policies.Threshold(1.0), sub_block_size=2, max_steps_per_block=cap)
  (row,), summary = generation.generate(fn, params, BYTES, [PROMPT], opt, 16, 32)
  want = min(cap, 8)
  assert row["steps_per_block"] == [want, want]
  assert row["nfe"] == 2 * want
  assert row["generated_tokens"] == 16 and opt.mask_id not in row["tokens"]
  # Sub-block caps add up to the budget, the remainder going to the last sub-blocks.
  caps = [int(opt.sub_step_cap(s)) for s in range(opt.num_sub)]
  assert sum(caps) == cap and max(caps) - min(caps) <= 1 and caps == sorted(caps)


def test_a_step_cap_below_the_sub_block_count_is_refused():
  # Before: max_steps_per_block=3 over 4 sub-blocks silently ran 4 steps per block.
  with pytest.raises(ValueError, match=r"max_steps_per_block=3 is fewer than the 4 "
                     r"sub-blocks.*block_size=8 / sub_block_size=2"):
    _options(sub_block_size=2, max_steps_per_block=3)
  # Through the sample config, the message names the flags a user sets.
  s = sample.default_sample_config()
  s.sub_block_size, s.max_steps_per_block = 2, 3
  with pytest.raises(ValueError, match=r"sample\.max_steps_per_block=3 .*diffusion\."
                     r"block_size=8 / sample\.sub_block_size=2"):
    sample.options_from_config(s, 8, BYTES)
  # Whole-block steps and caps of at least one step per sub-block stay valid.
  assert _options(max_steps_per_block=1).step_cap == 1
  assert _options(sub_block_size=2, max_steps_per_block=4).step_cap == 1


# --- generate(warmup=True) streams each block once. ---

def test_warmup_does_not_stream_the_blocks_twice():
  # Before: the warm-up run called on_block too, so every block arrived twice.
  fn, params = _bigram()
  opt = _options(policy=policies.Threshold(0.3), sub_block_size=4)
  got = {}
  for warmup in (False, True):
    calls = []
    rows, _ = generation.generate(
        fn, params, BYTES, [PROMPT, "<|bos|>xyz"], opt, 12, 32, warmup=warmup,
        on_block=lambda b, t, a, calls=calls: calls.append(
            (np.asarray(b).tolist(), np.asarray(a).tolist())))
    got[warmup] = (calls, [r["tokens"] for r in rows])
  assert got[True] == got[False]
  # Each row's blocks arrive once each: row 0 decodes blocks 1-2, row 1 blocks 0-1.
  streamed = sorted((row, blk[row]) for blk, act in got[True][0]
                    for row in range(2) if act[row])
  assert streamed == [(0, 1), (0, 2), (1, 0), (1, 1)]


# --- A CRLF prompts file reads as the LF one. ---

def test_a_crlf_prompts_file_gives_the_prompts_of_the_lf_file(tmp_path):
  # Before: every prompt of a CRLF file ended with "\r", which the model then continued.
  text = "<|bos|>sort: 3 1 2<|sep|>\n  <|bos|>add: 1+2<|sep|> \n\n<|bos|>x\ty\n"
  lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
  lf.write_bytes(text.encode())
  crlf.write_bytes(text.replace("\n", "\r\n").encode())
  got = {}
  for path in (lf, crlf):
    s = sample.default_sample_config()
    s.prompts_file = str(path)
    got[path] = sample.read_prompts(s)
  assert got[crlf] == got[lf] == ["<|bos|>sort: 3 1 2<|sep|>", "  <|bos|>add: 1+2<|sep|> ",
                                  "<|bos|>x\ty"]


# --- compare_ar with sampling is refused by the config check, before any load. ---

def test_compare_ar_with_a_temperature_is_refused_before_loading():
  # Before: validate passed; --mode=sample refused it only after loading the checkpoint.
  config = config_lib.from_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.sample.compare_ar, config.sample.temperature = True, 0.7
  with pytest.raises(ValueError, match=r"sample\.compare_ar=True compares greedy texts; "
                     r"set sample\.temperature=0, got 0\.7"):
    config_lib.validate(config)
  config.sample.temperature = 0.0
  config_lib.validate(config)
  # The step cap is checked there too, with the run's own block size (8).
  config.sample.sub_block_size, config.sample.max_steps_per_block = 2, 3
  with pytest.raises(ValueError, match=r"sample\.max_steps_per_block=3 is fewer than the 4"):
    config_lib.validate(config)
