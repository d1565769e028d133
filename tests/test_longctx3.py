"""Hardening of the long-context tasks, their scorer and evaluation (helper longctx3).

Covers: ``min_prompt_length`` against the byte count of a prompt's fixed parts;
``configs/long_context_extension.py`` at small factors (evaluation lengths that hold
the tasks); ``cache_fidelity`` with a summary-form hierarchy (which drops older
positions instead of factorising them); ``score`` agreeing with ``retrieval``'s hits on
completions that copy the needle's text.
"""

import importlib.util
import os

import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax.data import long_context as tasks
from blockdiff_jax.data import tokenizers
from blockdiff_jax.evaluation import eval_config
from blockdiff_jax.evaluation import long_context as lc_eval
from blockdiff_jax.model import build
from blockdiff_jax.sampling import hierarchical_cache as hc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fixed_bytes(task: str, num_pairs: int) -> int:
  """Bytes of a prompt's instruction, needles and question, spelt out by hand."""
  if task == "passkey":
    return len("A pass key is hidden in the text below. Remember it.\n\n"
               "\n\nThe pass key is 12345. Remember it. 12345 is the pass key.\n\n"
               "\n\nWhat is the pass key? The pass key is")
  needle = len('\n\nKey "0123abcd" has value "4567ef01".\n\n')
  return (len("Key-value pairs are hidden in the text below. Remember them.\n\n")
          + num_pairs * needle + len('\n\nWhat is the value of key "0123abcd"? The value is'))


@pytest.fixture(scope="module")
def byte_tok_and_haystack():
  tok = tokenizers.ByteTokenizer()
  return tok, tasks.load_haystack(tok, 2048)


@pytest.mark.parametrize("task,num_pairs", [("passkey", 4), ("kv_recall", 2),
                                            ("kv_recall", 4)])
def test_min_prompt_length_is_the_shortest_prompt_that_fits(byte_tok_and_haystack, task,
                                                            num_pairs):
  """A prompt needs one haystack token beyond its fixed parts; ``margin=0`` used to
  return the fixed parts alone, a length ``make_example`` refuses for every example.
  The default margin of 16 is 16 haystack tokens, as before."""
  tok, hay = byte_tok_and_haystack
  shortest = _fixed_bytes(task, num_pairs) + 1
  assert tasks.min_prompt_length(task, tok, num_pairs, margin=0) == shortest
  assert tasks.min_prompt_length(task, tok, num_pairs) == shortest - 1 + 16
  for index, depth in [(0, 0.0), (1, 0.5), (2, 1.0)]:
    ex = tasks.make_example(task, tok, hay, length=shortest, depth=depth, index=index,
                            num_pairs=num_pairs)
    assert ex.haystack_tokens == 1 and len(ex.prompt_ids) == shortest
    assert tasks.solve(ex) == ex.answer
    with pytest.raises(tasks.PromptTooShortError, match=f"length={shortest - 1} "):
      tasks.make_example(task, tok, hay, length=shortest - 1, depth=depth, index=index,
                         num_pairs=num_pairs)


def _extension_config(arg: str):
  path = os.path.join(_ROOT, "configs", "long_context_extension.py")
  spec = importlib.util.spec_from_file_location("long_context_extension_longctx3", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("arg,want", [("tiny,2", [512]), ("tiny,3", [512]),
                                      ("tiny,8", [512, 1024]),
                                      ("quickstart,8", [512, 1024, 2048])])
def test_extension_evaluates_lengths_that_hold_both_tasks(arg, want):
  """tiny,2 (64 -> 128 tokens) had no power-of-two length >= 512 up to twice the new
  length: the field came out empty and the evaluation fell back to seq_len * 2**i from
  128 tokens, shorter than either task's fixed parts (PromptTooShortError)."""
  c = _extension_config(arg)
  lengths = eval_config.long_context_lengths(c)
  assert lengths == want
  pairs = c.eval.long_context_num_pairs
  assert min(lengths) > max(_fixed_bytes(t, pairs) for t in tasks.TASKS)


def test_fidelity_refuses_a_summary_form_hierarchy():
  """The summary form keeps only the ring: a model without summary slots then reads no
  context older than it, and the KL came back with compressed_fraction 0 (nothing
  factorised) although half the cached context was gone."""
  model, _ = build.build_model(small_model_config())
  params = build.init_params(model, 0)
  tokens = (np.arange(40) * 7) % 200 + 3
  summary = hc.Hierarchy(window=1, chunk=8, rank=8, sinks=0, form="summary")
  rank = hc.Hierarchy(window=1, chunk=8, rank=8, sinks=0)
  with pytest.raises(ValueError, match="form 'summary'.*cache_fidelity.*use form 'rank'"):
    lc_eval.cache_fidelity(model, params, tokens, 32, [rank, summary])


@pytest.mark.parametrize("completion,hit", [
    (" {a}. Remember it.", True),  # The needle's own words after the question.
    (' "{a}".', True), ("{a}<|eos|>7", True), ("\n{a}\n", True), ("{a}", True),
    ("{a}0", False), ("{p}", False), ("The pass key is {a}.", False), ("", False),
    ("{a}.5", False), ("{a} 7", False), ("{a}-99", False)])  # Another number goes on.
def test_score_agrees_with_retrieval_hits(byte_tok_and_haystack, completion, hit):
  """``score`` demanded the bare answer, so a completion copying the needle sentence
  (" 48213. Remember it.") was a miss there and a hit in ``retrieval``'s rows."""
  tok, hay = byte_tok_and_haystack
  ex = tasks.make_example("passkey", tok, hay, length=400, depth=0.5)
  text = completion.format(a=ex.answer, p=ex.answer[:-1])
  assert tasks.exact_match(text, ex.answer) is hit
  assert lc_eval.answer_matches(text, ex.answer) is hit
  result = tasks.score([ex], [text])
  assert result["accuracy"] == float(hit)
  assert result["cells"] == [{"task": "passkey", "length": 400, "depth": 0.5, "n": 1,
                              "accuracy": float(hit)}]
