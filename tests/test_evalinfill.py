"""Hardening of the infilling, likelihood and long-context scorers (helper evalinfill).

Covers: ``score_infills`` given one string of middles (scored character by character as
a 0% model) or a ``workers`` that is not an integer >= 1; ``char_accuracy`` and
``char_rate`` on an empty answer (a bare ZeroDivisionError); ``cache_fidelity`` given a
[1, T] batch or a non-integer prefix, and ``retrieval`` given a non-integer batch size
(each failed far from the argument, or ran on); ``cache_fidelity``'s KL where a model
rules a token out (-inf logits: NaN instead of 0).
"""

import types

import numpy as np
import pytest

from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import long_context as lc_eval

_PROBLEM = {"task_id": "T/0", "prompt": "def f(x):\n",
            "canonical_solution": "    y = x\n    return y\n",
            "test": "def check(f):\n    assert f(1) == 1\n", "entry_point": "f"}


@pytest.fixture(scope="module")
def tasks():
  got = infilling.make_tasks_for_problem(_PROBLEM)
  assert [t.kind for t in got] == ["single-line", "multi-line"]
  return got


@pytest.mark.parametrize("middles", ["ab", b"ab"])
def test_score_infills_refuses_one_string_of_middles(tasks, middles):
  """Two characters for two tasks: each task was scored against one character."""
  with pytest.raises(ValueError, match="middles must be a sequence of strings"):
    infilling.score_infills(tasks, middles)


@pytest.mark.parametrize("workers", [0, 2.5, True])
def test_score_infills_names_a_bad_worker_count(tasks, workers):
  """2.5 and True ran (a thread pool takes them); 0 failed naming max_workers."""
  with pytest.raises(ValueError, match="workers must be an integer >= 1"):
    infilling.score_infills(tasks, [t.middle for t in tasks], workers=workers)


def test_char_accuracy_of_an_empty_answer_is_named():
  with pytest.raises(ValueError, match="answer is empty"):
    lc_eval.char_accuracy("123", "")
  rows = [{"task": "passkey", "completion": "1", "answer": "1"},
          {"task": "passkey", "completion": "1", "answer": ""}]
  with pytest.raises(ValueError, match="answer is empty"):
    lc_eval.char_rate(rows)
  # Rows with answers still score as before.
  assert lc_eval.char_rate(rows[:1]) == 1.0
  assert lc_eval.char_accuracy(" \"4821\"", "48213") == pytest.approx(0.8)


@pytest.mark.parametrize("tokens,prefix,match", [
    (np.arange(40)[None], 32, r"one sequence of token ids \[T\], got shape \(1, 40\)"),
    (np.arange(40), 32.0, "prefix must be an integer, got 32.0"),
    (np.arange(40), True, "prefix must be an integer, got True"),
])
def test_cache_fidelity_names_a_batch_or_a_float_prefix(tokens, prefix, match):
  """A [1, 40] batch read as one token ("prefix=32 of 1"); 32.0 failed as a slice index.

  Both are refused before the model is read (so no model is needed here).
  """
  with pytest.raises(ValueError, match=match):
    lc_eval.cache_fidelity(None, None, tokens, prefix, [])


@pytest.mark.parametrize("batch_size", [2.5, True, "2"])
def test_retrieval_names_a_non_integer_batch_size(batch_size):
  """2.5 failed as range()'s step, True decoded as 1, "2" failed comparing with 1."""
  example = types.SimpleNamespace(prompt_ids=[5, 6, 7], task="passkey", length=3,
                                  depth=0.5, answer="1")
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    lc_eval.retrieval(None, None, None, [example, example], options=None,
                      batch_size=batch_size)


def test_cache_fidelity_kl_is_zero_where_both_caches_rule_a_token_out():
  """A logits function that bans tokens (-inf logits) has p = 0 there: 0 * log(0 / 0) is
  0 in a KL, but exp(-inf) * (-inf - -inf) read NaN, so an exact cache reported NaN."""
  from conftest import BigramLM  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import hierarchical_cache as hc  # pylint: disable=g-import-not-at-top
  vocab, mask_id = 12, 11
  table = np.random.default_rng(0).normal(size=(vocab, vocab)).astype(np.float32)
  table[:, 0] = -np.inf  # Token 0 is never predicted.
  table[:, mask_id] = -np.inf
  params = {"table": table}
  tokens = (np.arange(24) * 5) % 10 + 1
  # A ring of 5 x 8 >= 16 cached positions: the full cache itself, so the KL is exactly 0.
  (got,) = lc_eval.cache_fidelity(BigramLM(mask_id), params, tokens, 16,
                                  [hc.Hierarchy(window=4, chunk=8, rank=2)])
  assert got.kl == 0.0 and got.kl_max == 0.0 and got.top1_agreement == 1.0
