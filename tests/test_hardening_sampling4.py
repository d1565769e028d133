"""Sampling, fourth pass: config errors name the flag a user typed; TopK's per-block budget."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from conftest import BigramLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- A bad ``--config.sample.*`` flag is named as typed, before anything is built. ---

def _tiny_config():
  return config_lib.from_file(os.path.join(ROOT, "configs", "tiny.py"))


@pytest.mark.parametrize("fields,match", [
    # Before: "sub_block_size=3 must divide block_size=8", "patience must be >= 1"... --
    # DecodeOptions' own names, not the flags (nor the diffusion section's block size).
    ({"sub_block_size": 3}, r"sample\.sub_block_size=3 must divide diffusion\.block_size=8"),
    ({"max_steps_per_block": -1}, r"sample\.max_steps_per_block must be >= 0"),
    ({"edit_threshold": 1.5}, r"sample\.edit_threshold must be in \[0, 1\]"),
    ({"patience": 0}, r"sample\.patience must be >= 1"),
    # Before: accepted; jax.random.key keeps 32 bits, so seed 2**32 drew as seed 0.
    ({"seed": 2**32}, r"sample\.seed must be an integer in \[0, 2\*\*32\)"),
    ({"seed": -1}, r"sample\.seed"),
    # Before: accepted; --mode=sample failed only after loading the checkpoint.
    ({"prompts": ";"}, r"no prompts: set sample\.prompts"),
    ({"policy": "isd"}, r"sample\.policy='isd' needs a token-shifted model"),
    ({"policy": "ar", "kv_cache": "hierarchical", "kv_form": "summary", "kv_chunk": 8},
     r"sample\.kv_form='summary' works with the block decoder"),
    # Before: accepted, and --mode=sample silently sampled without the comparison.
    ({"policy": "ar", "compare_ar": True}, r"sample\.compare_ar=True compares a diffusion"),
])
def test_a_bad_sample_field_is_named_by_its_config_path(fields, match):
  config = _tiny_config()
  for field, value in fields.items():
    config.sample[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_a_fractional_topk_step_count_is_refused_not_truncated():
  """``policy_value=2.5`` with ``topk`` silently ran 2 steps per block."""
  config = _tiny_config()
  config.sample.policy, config.sample.policy_value = "topk", 2.5
  with pytest.raises(ValueError, match=r"sample\.policy_value=2\.5 .*whole number"):
    config_lib.validate(config)
  config.sample.policy_value = 2.0
  config.sample.seed = 2**32 - 1  # The largest seed jax keeps whole.
  config_lib.validate(config)
  assert policies.make_policy("topk", 2.0) == policies.TopK(2)


def test_mode_sample_names_the_bad_flag_before_loading_anything(tmp_path):
  """The real CLI: the error names the flag; the empty workdir is never read."""
  proc = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--mode=sample", "--config.sample.sub_block_size=3"],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "sample.sub_block_size=3 must divide diffusion.block_size=8" in proc.stderr, \
      proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")


# --- TopK: ``steps`` is a budget per block, with sub-blocks too. ---

MASK, EOS, VOCAB, BLOCK = 11, 10, 12, 8


def _expected_steps(region_blk: np.ndarray, steps: int, sub: int) -> int:
  """Steps TopK takes on one block: k = ceil(block candidates / steps) per step, filled
  sub-block by sub-block (sub-blocks without candidates are skipped)."""
  k = max(-(-int(region_blk.sum()) // steps), 1)
  return sum(-(-int(region_blk[lo:lo + sub].sum()) // k)
             for lo in range(0, len(region_blk), sub) if region_blk[lo:lo + sub].any())


@pytest.mark.parametrize("sub_block", [0, 4, 2])
def test_topk_steps_are_per_block_with_sub_blocks(sub_block):
  # Before: k was sized by the sub-block, so TopK(2) took 2 steps per sub-block (8 per
  # block of 4 sub-blocks) although policy_value is "steps per block".
  table = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32)
  table[:, MASK] = -1e9
  prompts = [np.arange(1, 9, dtype=np.int32), np.array([1, 2, 3, 4, 5], np.int32)]
  cv = layout.generation_canvas(prompts, 19, BLOCK, MASK, 64)
  steps = 2
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.TopK(steps), sub_block_size=sub_block,
                             token_shift=True, stop_at_eos=False)
  out = decoder.decode(BigramLM(MASK), {"table": jnp.asarray(table)}, cv, opt)
  assert not (out["tokens"][cv.maskable] == MASK).any()
  for i in range(len(prompts)):
    region = cv.maskable[i] & (np.arange(cv.tokens.shape[1]) < cv.length[i])
    want = [_expected_steps(region[b * BLOCK:(b + 1) * BLOCK], steps, sub_block or BLOCK)
            for b in range(cv.tokens.shape[1] // BLOCK)]
    np.testing.assert_array_equal(out["steps"][i], want, err_msg=f"row {i}")
    assert int(out["nfe"][i]) == sum(want)  # Commits ride along: one forward per step.
  if sub_block in (0, 4):  # Full blocks of 8 candidates: exactly the budget of 2.
    assert out["steps"][0, 1] == out["steps"][0, 2] == out["steps"][1, 1] == steps


def test_an_edit_threshold_of_one_decodes_as_editing_off():
  """No probability exceeds 1, so ``edit_threshold=1`` can rewrite nothing.

  Before, it still counted as editing: every block waited ``patience`` idle steps and the
  early EOS stop was off (NFE 19 -> 22 on the bigram row below, no edit made).
  """
  table = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32)
  table[:, MASK] = -1e9
  eos_table = table.copy()
  eos_table[7, EOS] = 9.0  # After 7 the bigram says EOS: a row that stops early.
  cv = layout.generation_canvas([np.arange(1, 6, dtype=np.int32),
                                 np.array([3, 1], np.int32)], 19, BLOCK, MASK, 64)
  for tab in (table, eos_table):
    outs = [decoder.decode(BigramLM(MASK), {"table": jnp.asarray(tab)}, cv,
                           layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                                                policy=policies.Threshold(0.5),
                                                edit_threshold=et, token_shift=True))
            for et in (0.0, 1.0)]
    for key in ("tokens", "nfe", "steps", "edits"):
      np.testing.assert_array_equal(outs[1][key], outs[0][key], err_msg=key)
  assert (outs[0]["tokens"] == EOS).any()  # The EOS table did stop a row.


def test_a_byte_order_mark_does_not_start_the_first_prompt_or_question(tmp_path):
  """Windows editors save UTF-8 with a BOM; it reached the model as U+FEFF."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import distill  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import sample  # pylint: disable=g-import-not-at-top
  path = tmp_path / "prompts.txt"
  path.write_bytes("\ufeffFirst question?\nSecond one\n".encode("utf-8"))
  s = ml_collections.ConfigDict({"prompts_file": str(path), "prompts": ""})
  assert sample.read_prompts(s) == ["First question?", "Second one"]
  assert distill.questions(str(path), 5) == ["First question?", "Second one"]
