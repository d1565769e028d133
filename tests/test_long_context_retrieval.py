"""evaluation.long_context.retrieval: batched by length, wrapped prompts, either decoder."""

import numpy as np
import pytest

from conftest import small_model_config

from blockdiff_jax.data import long_context as lc
from blockdiff_jax.evaluation import long_context
from blockdiff_jax.model import build
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies

BLOCK = 8


@pytest.fixture(scope="module")
def setup():
  c = small_model_config()
  c.diffusion.block_size = BLOCK
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  # Two lengths, interleaved, so grouping by length must restore the order.
  examples = lc.make_suite(tok, lengths=[176, 200], depths=[0.2, 0.8], per_cell=2,
                           tasks=["passkey"])
  examples = examples[::2] + examples[1::2]
  return model, tok, params, examples


def _options(tok, **kw):
  return layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.make_policy("topk", BLOCK), **kw)


def _alone(model, params, tok, ex, options, dec, wrap, new):
  """The slow reference: one canvas per prompt, decoded by the decoder's own API."""
  ids = long_context.prompt_ids(tok, ex, wrap)
  cv = layout.generation_canvas([ids], new, BLOCK, tok.mask_id, len(ids) + new)
  out = (ar.decode_ar if dec == "ar" else decoder.decode)(model, params, cv, options)
  gen = np.asarray(out["tokens"][0, len(ids):cv.length[0]])
  cut = np.nonzero(gen == tok.eos_id)[0]
  return tok.decode(gen[:cut[0]] if cut.size else gen)


@pytest.mark.parametrize("dec,wrap", [("block", True), ("block", False), ("ar", True)])
def test_batched_rows_equal_each_prompt_decoded_alone(setup, dec, wrap):
  model, tok, params, examples = setup
  if dec == "ar":  # One length: the AR decoder compiles per prompt length (slow).
    examples = [e for e in examples if e.length == examples[0].length][:3]
  options = _options(tok)
  rows = long_context.retrieval(model, params, tok, examples, options, max_new_tokens=6,
                                decoder=dec, wrap=wrap, batch_size=3)
  assert [(r["length"], r["depth"]) for r in rows] == [(e.length, e.depth) for e in examples]
  for ex, row in zip(examples, rows):
    assert row["completion"] == _alone(model, params, tok, ex, options, dec, wrap, 6)
    assert row["hit"] == long_context.answer_matches(row["completion"], ex.answer)


def test_wrapped_prompt_is_the_training_layout(setup):
  _, tok, _, examples = setup
  ids = long_context.prompt_ids(tok, examples[0], wrap=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.sep_id
  np.testing.assert_array_equal(ids[1:-1], examples[0].prompt_ids)


def test_bad_decoder_and_batch_are_named(setup):
  model, tok, params, examples = setup
  with pytest.raises(ValueError, match="decoder must be one of"):
    long_context.retrieval(model, params, tok, examples, _options(tok), decoder="isd")
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    long_context.retrieval(model, params, tok, examples, _options(tok), batch_size=0)


def test_experiment_lineage_names_the_evaluated_step_then_each_source(tmp_path):
  """experiments/long_context_retrieval.py: ``--eval_step`` changes the first link of the
  lineage line only; the sources keep their newest checkpoints."""
  import json  # pylint: disable=g-import-not-at-top
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  for name, steps, src in (("A", (250, 500), ""), ("C1", (150, 300, 450), "A")):
    c = config_lib.base_config()
    c.init_from.workdir, c.init_from.step = (str(tmp_path / src), 500) if src else ("", -1)
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(c.to_dict()))
    for s in steps:
      (tmp_path / name / "checkpoints" / str(s)).mkdir(parents=True)
  mod = load_experiment("long_context_retrieval")
  assert mod.lineage(str(tmp_path / "C1")) == "C1: 450 steps from A@500; A: 500 steps"
  assert mod.lineage(str(tmp_path / "C1"), 150) == "C1: 150 steps from A@500; A: 500 steps"
  assert mod.lineage(str(tmp_path / "gone")) == "gone: not found"
