"""experiments/decode_window_speed.py: the weights it loads must match the run's config."""

import json

import pytest

from conftest import load_experiment
from blockdiff_jax import config as config_lib


def _module():
  return load_experiment("decode_window_speed")


def _save(tmp_path, config):
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))


def test_a_config_that_differs_from_the_run_is_refused_by_field(tmp_path):
  """A run trained with causal blocks, decoded with the config's 'auto', would be read
  with the wrong mask; the refusal names the field and the override to add."""
  mod = _module()
  run = config_lib.base_config()
  run.diffusion.block_attention = "causal"
  run.model.lora.rank = 8
  run.train.learning_rate = 1.0  # Training fields never matter for decoding.
  _save(tmp_path, run)
  here = config_lib.base_config()
  here.model.lora.rank = 8
  with pytest.raises(SystemExit, match=r"diffusion.block_attention='causal'.*'auto'.*"
                     r"add diffusion.block_attention=causal to --config_overrides"):
    mod.check_matches_run(here, str(tmp_path))
  here.diffusion.block_attention = "causal"
  mod.check_matches_run(here, str(tmp_path))
  here.model.remat = not run.model.remat  # How to compute, not what: free.
  here.model.attention_impl = "pallas"
  mod.check_matches_run(here, str(tmp_path))
  here.model.lora.rank = 4
  with pytest.raises(SystemExit, match="model.lora.rank=8"):
    mod.check_matches_run(here, str(tmp_path))


def test_fields_newer_than_the_run_and_runs_without_a_config_pass(tmp_path):
  mod = _module()
  saved = config_lib.base_config().to_dict()
  del saved["diffusion"]["block_attention"]  # A run saved before the field existed.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  mod.check_matches_run(config_lib.base_config(), str(tmp_path))
  mod.check_matches_run(config_lib.base_config(), str(tmp_path / "elsewhere"))


def test_isd_narrow_and_wide_are_timed_interleaved_with_the_same_tokens(tiny_decoder):
  """``measure`` with ISD runs: both shapes decode every prompt to the same tokens as AR,
  in the same forwards, and every run gets a time."""
  import argparse  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True)
  runs = [("AR", opts, True, 0)] + [
      (f"ISD N=3, {s}", dataclasses.replace(opts, narrow_window=s == "narrow"), False, 3)
      for s in ("narrow", "wide")]
  args = argparse.Namespace(max_new_tokens=12, width=48, repeats=2)
  res = _module().measure(model, params, tok, ["<|bos|>sort: 3 1 2", "<|bos|>ab"], runs,
                          args, lambda m: None)
  narrow, wide = res["ISD N=3, narrow"], res["ISD N=3, wide"]
  assert narrow["answers"] == wide["answers"] == res["AR"]["answers"]
  assert narrow["nfe"] == wide["nfe"] <= res["AR"]["nfe"]
  assert all(r["wall_s"] > 0 and r["tokens_per_s"] > 0 for r in res.values())
