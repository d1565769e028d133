"""Leftover hardening: long-context answer matching, schedule fields, eval decoders and
long-context cells, and validation metrics over a small split's real rows only."""

import jax
import numpy as np
import pytest

from blockdiff_jax.data import long_context as lc_data
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import long_context as lc_eval
from blockdiff_jax.model import build
from blockdiff_jax.train import step
from blockdiff_jax.train import trainer
from conftest import load_config_file
from conftest import small_model_config


# long_context: the answer must end where the prompts end it.


@pytest.mark.parametrize("completion,hit", [
    # How the needles end a key: '"b7d2e915".' and "48213. Remember it.".
    ("b7d2e915", True), (' "b7d2e915".', True), ("b7d2e915. It is", True),
    ("b7d2e915,\n", True), ("b7d2e915 is the value", True), ("b7d2e915!)", True),
    # The key glued to more text, or another number after it: misses.
    ("b7d2e915_x", False), ("b7d2e915-ab", False), ("b7d2e915.x", False),
    ("b7d2e915~", False), ("b7d2e915/2", False), ("b7d2e915  7", False),
    ("b7d2e915. 7", False), ("b7d2e915.5", False), ("b7d2e915f", False),
    # A line break ends the answer whatever follows; curly and CJK closers end it too.
    ("b7d2e915\n\n1. ", True), ("b7d2e915.\n2", True), ("b7d2e915 \r\n7", True),
    ("b7d2e915.\u201d", True), ("b7d2e915\u3002", True), ("b7d2e915*", True),
    ("b7d2e915, 7", False), ("b7d2e915-", False), ("b7d2e915\t7", False),
    # Unicode blanks and line breaks as ASCII ones (review): NBSP, ideographic space,
    # vertical tab, a lone CR, U+2028.
    ("b7d2e915\xa0Remember", True), ("b7d2e915\u3000ok", True), ("b7d2e915\x0bx", True),
    ("b7d2e915\rok", True), ("b7d2e915\u20287", True), ("b7d2e915\xa07", False),
])
def test_answer_must_end_as_the_prompt_ends_it(completion, hit):
  """HEAD: anything after a non-alphanumeric character passed, so "b7d2e915_x" and
  "b7d2e915  7" (two spaces, then another number) were hits."""
  assert lc_data.exact_match(completion, "b7d2e915") is hit
  assert lc_eval.answer_matches(completion, "b7d2e915") is hit


# diffusion: schedule fields that are not numbers.


@pytest.mark.parametrize("make,field", [
    (lambda: schedules.NoiseRange(None), "diffusion.beta"),
    (lambda: schedules.NoiseRange(0.1, None), "diffusion.omega"),
    (lambda: schedules.NoiseRange("0.1"), "diffusion.beta"),
    (lambda: schedules.LogLinearSchedule(eps=None), "diffusion.eps"),
    (lambda: schedules.make_schedule("loglinear", "1e-3"), "diffusion.eps"),
])
def test_a_schedule_field_that_is_not_a_number_is_named(make, field):
  """HEAD: TypeError "'<=' not supported between instances of 'float' and 'NoneType'"."""
  with pytest.raises(ValueError, match=rf"{field}.*(None|'0\.1'|'1e-3')"):
    make()


# evaluate: eval.decoders and the long-context cells.


def test_decoders_that_report_under_one_name_are_refused():
  """HEAD: both decoded, and the second's results overwrote the first's under the one
  name "threshold:0.9" (the name keeps 6 digits)."""
  with pytest.raises(ValueError, match=r"eval\.decoders: threshold:0\.9000001 and "
                                       r"threshold:0\.9 both report as 'threshold:0\.9'"):
    evaluate._parse_decoders("threshold:0.9,threshold:0.9000001")
  got = evaluate._parse_decoders("threshold:0.9,threshold:0.900001")  # Names differ.
  assert [evaluate._decoder_name(*d) for d in got] == ["threshold:0.9", "threshold:0.900001"]


def test_a_decoder_or_task_named_twice_is_said_once(monkeypatch, capsys):
  """HEAD: dropped without a word (an earlier commit said they were refused)."""
  class Loaded(Exception):
    pass

  def load(workdir, config):
    raise Loaded
  monkeypatch.setattr(evaluate.inference, "load_for_inference", load)
  c = load_config_file("tiny")
  c.eval.tasks, c.eval.decoders = "throughput,likelihood,throughput", "ar,topk:2,ar"
  with pytest.raises(Loaded):
    evaluate.run(c, "/nonexistent")
  out = capsys.readouterr().out
  assert out.count("eval.decoders names ar more than once") == 1
  assert out.count("eval.tasks names 'throughput' more than once") == 1
  assert evaluate._parse_decoders("ar,topk:2,ar") == [("ar", None), ("topk", 2.0)]
  assert capsys.readouterr().out == ""  # Only run() says it.


def test_a_repeated_long_context_cell_is_scored_once(monkeypatch):
  """HEAD: "128,128,256" built the 128 prompts twice: overall exact match 2/3 for a
  model right on every 128 prompt and wrong on every 256 one, where each length's
  rate is 1 and 0."""
  def make_suite(tok, *, lengths, depths, tasks, per_cell, **unused):
    return [dict(task=t, length=n, depth=d) for t in tasks for n in lengths for d in depths
            for _ in range(per_cell)]

  def retrieval(model, params, tok, suite, *args, **kwargs):
    return [dict(cell, answer="1", completion="1", hit=cell["length"] == 128)
            for cell in suite]
  monkeypatch.setattr(evaluate.long_context_data, "make_suite", make_suite)
  monkeypatch.setattr(evaluate.long_context_eval, "retrieval", retrieval)
  monkeypatch.setattr(evaluate.Evaluator, "options", lambda self, policy, value: None)
  c = load_config_file("tiny")
  c.eval.decoders = "threshold:0.9"
  c.eval.long_context_lengths = "128,128,256"
  c.eval.long_context_depths = "0.5,0.50,0.9"
  c.eval.long_context_tasks = "passkey, passkey,kv_recall"
  out = evaluate.task_long_context(evaluate.Evaluator(c, None, None, None))
  got = out["decoders"]["threshold:0.9"]
  assert out["lengths"] == [128, 256]
  assert got["by_length"] == {"128": 1.0, "256": 0.0}
  assert got["exact_match"] == 0.5  # The mean of the two lengths' rates, cells alike.


# trainer: validation of a split smaller than the evaluated batches.


def test_val_loss_and_moe_aux_use_only_the_splits_real_rows():
  """A 3-row split read in batches of 2 ends in a batch [row 2, row 0 again]. HEAD
  zeroed the repeat's loss_mask, so the NELBO was right, but the MoE load-balance and
  z-losses (and ``loss``, which adds them) still pooled the repeated row's tokens.

  Reference, by hand: each batch's metrics from a forward of its real rows alone,
  weighed by the tokens it scores. Every scored token is masked (t in [1 - 1e-6, 1]),
  so a row's forward does not depend on the noise key or the batch it sits in.
  """
  model, tok = build.build_model(small_model_config(num_layers=1))
  params = build.init_params(model, 0)
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=tok.mask_id,
                                       noise=schedules.NoiseRange(1 - 1e-6, 1.0))
  eval_step = jax.jit(step.make_eval_step(build.make_apply(model), obj))
  split = np.random.default_rng(0).integers(10, 200, (3, 16)).astype(np.int32)

  def batch(rows):
    return {"tokens": rows, "loss_mask": np.ones_like(rows),
            "segment_ids": np.zeros_like(rows)}

  class Split:
    num_rows = 3

    def get_batch(self, i):
      return batch(split[[(2 * i) % 3, (2 * i + 1) % 3]])

  got = trainer.evaluate_nelbo(eval_step, params, Split(), 5, seed=0)
  first = jax.device_get(eval_step(params, batch(split[:2]), jax.random.key(0)))
  last = jax.device_get(eval_step(params, batch(split[2:]), jax.random.key(1)))
  assert got[losses.LOSS_TOKENS] == 48.0
  for k in ("nelbo", "loss", "load_balance_loss", "router_z_loss", "masked_accuracy"):
    want = (32 * float(first[k]) + 16 * float(last[k])) / 48
    assert float(got[k]) == pytest.approx(want, rel=1e-5), k
  # Not vacuous: the repeated row moves the MoE terms the fix keeps out.
  pooled = jax.device_get(eval_step(params, batch(split[[2, 0]]), jax.random.key(1)))
  assert abs(float(pooled["router_z_loss"]) - float(last["router_z_loss"])) > 1e-3


@pytest.mark.parametrize("seg", [True, False])
def test_unscored_rows_are_padding_with_or_without_segment_ids(seg):
  rows = np.arange(12, dtype=np.int32).reshape(3, 4)
  b = {"tokens": rows, "loss_mask": np.ones_like(rows)}
  if seg:
    b["segment_ids"] = np.array([[0, 0, 1, 1]] * 3, np.int32)
  out = trainer._unscore_rows_from(b, 1)
  np.testing.assert_array_equal(out["loss_mask"], [[1] * 4, [0] * 4, [0] * 4])
  np.testing.assert_array_equal(out["segment_ids"][1:], -np.ones((2, 4)))
  np.testing.assert_array_equal(out["segment_ids"][0], [0, 0, 1, 1] if seg else [0] * 4)
  assert b["loss_mask"].min() == 1  # The caller's batch is left as it was.


def test_a_small_split_compiles_the_eval_step_once():
  """The padding rows of the last batch added segment_ids to it alone: a batch of a new
  structure, so eval_step compiled twice (minutes on a large model)."""
  c = small_model_config(num_layers=1)
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  obj = diffusion_config.objective(c, tok.mask_id)
  eval_step = jax.jit(step.make_eval_step(build.make_apply(model), obj))
  rows = np.random.default_rng(0).integers(10, 200, (3, 16)).astype(np.int32)

  class Split:
    num_rows = 3

    def get_batch(self, i):
      r = rows[[(2 * i) % 3, (2 * i + 1) % 3]]
      return {"tokens": r, "loss_mask": np.ones_like(r)}

  out = trainer.evaluate_nelbo(eval_step, params, Split(), 5, seed=0)
  assert eval_step._cache_size() == 1  # pylint: disable=protected-access
  assert np.isfinite(out["nelbo"])
