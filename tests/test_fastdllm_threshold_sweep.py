"""experiments/fastdllm_threshold_sweep.py: its quality measures against slow references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_experiment
from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import build


def _module():
  return load_experiment("fastdllm_threshold_sweep")


@pytest.mark.parametrize("tokens,n,share", [
    ([1, 2, 3, 4, 1, 2, 3, 4], 4, 1 / 5),  # Only the last 4-gram repeats the first.
    ([5, 5, 5, 5, 5, 5], 4, 2 / 3),
    ([1, 2, 3, 4, 5, 6], 4, 0.0),
    ([1, 2, 1, 2, 1], 2, 2 / 4),
    ([1, 2], 4, 0.0),  # Shorter than n: nothing to repeat.
])
def test_repeated_ngram_share(tokens, n, share):
  assert _module().repeated_ngram_share(tokens, n) == pytest.approx(share)


@pytest.mark.parametrize("prompt_len,answer_len", [(3, 4), (1, 3)])
def test_base_nll_equals_a_prefix_by_prefix_loop(prompt_len, answer_len):
  c = config_lib.base_config()
  c.model.moe.num_experts = 0
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 32, 2, 1, 16
  c.diffusion.token_shift = True
  c.diffusion.objective = "fastdllm"
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  rng = np.random.default_rng(prompt_len * 100 + answer_len)
  ids = rng.integers(0, 200, prompt_len + answer_len).tolist()
  prompt, answer = ids[:prompt_len], ids[prompt_len:]
  score = _module().base_nll_fn(c, model, tok.mask_id, width=16)
  # The prefix ids[:j] alone predicts ids[j]: a causal forward of ids[:j] then 0s (one
  # shape, one compile) read at j-1, where the 0s stand in for what it must not see.
  width = len(ids)
  meta = masks.make_meta(jnp.arange(width)[None], 1, masks.CLEAN)
  apply_fn = jax.jit(lambda p, toks: build.make_apply(model)(p, toks, meta)[0])
  nll = []
  for j in range(prompt_len, len(ids)):
    toks = np.zeros((1, width), np.int32)
    toks[0, :j] = ids[:j]
    logits = apply_fn(params, jnp.asarray(toks))
    nll.append(-float(jax.nn.log_softmax(logits[0, j - 1].astype(jnp.float32))[ids[j]]))
  np.testing.assert_allclose(score(params, prompt, answer), np.mean(nll), rtol=1e-4)
  assert np.isnan(score(params, prompt, []))  # No answer: nothing to score.


@pytest.mark.parametrize("question,task", [
    ("sort: 3 1 2", "sort"), ("add: 12+30", "add"), ("copy_edit: abc; set 1 to z", "copy_edit"),
    ("What does os.path.join do?", None), ("sort: not numbers", None), ("sorted: 3 1", None)])
def test_synthetic_task_recognises_only_well_formed_task_prompts(question, task):
  assert _module().synthetic_task(question) == task


def test_task_exact_match_scores_only_task_questions_against_the_solution():
  mod = _module()
  questions = ["sort: 3 1 2", "add: 12+30", "What is Python?", "copy_edit: abc; set 1 to z"]
  texts = ["1 2 3", "41", "a language", "azc  "]  # add is wrong; trailing space is cut.
  assert mod.task_exact_match(questions, texts) == pytest.approx(2 / 3)
  assert mod.task_exact_match(["What is Python?"], ["a language"]) is None


def test_exact_match_by_task_counts_against_the_task_solution():
  qs = ["sort: 3 1 2", "sort: 9 7", "add: 12+30", "What is Python?"]
  texts = ["1 2 3", "9 7", "42", "a language"]  # The second sort is wrong.
  assert _module().exact_match_by_task(qs, texts) == {"sort": [1, 2], "add": [1, 1]}


def test_markdown_has_a_task_column_only_with_task_questions():
  mod = _module()
  env = {"backend": "cpu", "jax": jax.__version__, "cpus": 2, "machine": "x86_64",
         "load_avg": (1.0, 1.0, 1.0), "total_s": 1.0, "command": "x"}
  meta = {"weights": "w", "prompts": 1, "questions": "heldout", "max_new_tokens": 8,
          "width": 64, "block_size": 32, "sub_block_size": 8}
  row = {"decoder": "base AR", "threshold": None, "tpf": 1.0, "tokens_per_s": 2.0,
         "x_ar": 1.0, "base_nll": 0.5, "repeated_4grams": 0.0, "token_agreement": 1.0,
         "exact_match": 1.0, "texts": ["1 2 3"]}
  assert "task EM" not in mod.markdown([row], meta, env)
  text = mod.markdown([{**row, "task_exact_match": 0.25}], meta, env)
  assert "| decoder | TPF | tok/s | x AR | base NLL | repeats | agreement | exact | task EM |" \
      in text and "| 1.00 | 0.25 |" in text


def test_ar_reference_must_be_an_ar_run(tmp_path):
  """--ar_workdir names the AR-SFT run; a diffusion run there is refused by name."""
  import json  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.diffusion.token_shift = True
  c.diffusion.objective = "fastdllm"
  (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
  with pytest.raises(SystemExit, match="not 'ar'"):
    _module().load_ar_sft(str(tmp_path), None)
  c.diffusion.objective = "ar"
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
  with pytest.raises(SystemExit, match="no checkpoint"):
    _module().load_ar_sft(str(tmp_path), None)


def test_isd_rows_are_checked_against_the_adapted_models_own_ar_decoding(tiny_decoder):
  """The sweep's ISD rows decode the adapted weights losslessly: run through the script's
  own ``run_decoder``, ISD's answers equal one-token-per-forward AR decoding of the same
  weights, in no more forwards, and the table gets the `= adapted AR` column."""
  import argparse  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
  mod = _module()
  model, tok, params = tiny_decoder
  w = types.SimpleNamespace(model=model, tok=tok)
  args = argparse.Namespace(max_new_tokens=12, width=48)
  opts = layout.DecodeOptions(block_size=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True)
  prompts = ["<|bos|>sort: 3 1 2", "<|bos|>ab"]
  ar = mod.run_decoder(w, params, prompts, opts, True, args)
  for stride in (2, 3):
    got = mod.run_decoder(w, params, prompts, opts, False, args, isd_stride=stride)
    assert [r["tokens"] for r in got["rows"]] == [r["tokens"] for r in ar["rows"]]
    assert got["forwards"] <= ar["forwards"] and got["tpf"] >= 1.0
    # Every ISD forward at 2N-1 slots: the same tokens and forwards, none of them narrow.
    wide = mod.run_decoder(w, params, prompts, dataclasses.replace(opts, narrow_window=False),
                           False, args, isd_stride=stride)
    assert [r["tokens"] for r in wide["rows"]] == [r["tokens"] for r in got["rows"]]
    assert wide["forwards"] == got["forwards"] and wide["narrow_forwards"] == 0
    assert 0 <= got["narrow_forwards"] < got["forwards"]
  env = {"backend": "cpu", "jax": jax.__version__, "cpus": 2, "machine": "x86_64",
         "load_avg": (1.0, 1.0, 1.0), "total_s": 1.0, "command": "x"}
  meta = {"weights": "w", "prompts": 1, "questions": "heldout", "max_new_tokens": 8,
          "width": 64, "block_size": 32, "sub_block_size": 8,
          "block_attention": mod.block_attention(model)}
  row = {"decoder": "base AR", "threshold": None, "tpf": 1.0, "tokens_per_s": 2.0,
         "x_ar": 1.0, "base_nll": 0.5, "repeated_4grams": 0.0, "token_agreement": 1.0,
         "exact_match": 1.0, "texts": ["1 2 3"], "same_as_adapted_ar": None}
  assert "= adapted AR" not in mod.markdown([row], meta, env)
  text = mod.markdown([row, {**row, "decoder": "ISD N=2", "same_as_adapted_ar": 1.0,
                             "narrow_forwards": 3, "forwards": 7}], meta, env)
  rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
  assert "| exact | = adapted AR |" in text
  assert rows["| ISD N=2"].endswith("| 1.00 | 1.00 |") and rows["| base AR"].endswith("| - |")
  assert "attention inside a block: bidirectional" in text
  assert "ran N slots (no drafts to verify): ISD N=2: 3/7." in text
