"""Hardening of the data layer: BPE reuse, bool config fields, long-context needles."""

import json
import re

import ml_collections
import numpy as np
import pytest

from blockdiff_jax.data import config as config_lib
from blockdiff_jax.data import corpora
from blockdiff_jax.data import long_context
from blockdiff_jax.data import tokenizers


def _bpe_config(size=300):
  d = config_lib.default_data_config()
  d.corpus, d.tokenizer, d.bpe_vocab_size = "synthetic", "bpe", size
  return d


def test_bpe_reuse_refuses_other_vocab_size_or_corpus(tmp_path):
  workdir = str(tmp_path / "run")
  d = _bpe_config(300)
  assert tokenizers.get_tokenizer(d, workdir).vocab_size == 300
  # The same request reuses the file (a resumed run).
  assert tokenizers.get_tokenizer(d, workdir).vocab_size == 300
  d.bpe_vocab_size = 400  # Used to return the 300-token tokenizer silently.
  with pytest.raises(ValueError, match=r"data\.bpe_vocab_size=300 \(config: 400\)"):
    tokenizers.get_tokenizer(d, workdir)
  d.bpe_vocab_size, d.synthetic_tasks = 300, "sort"
  with pytest.raises(ValueError, match=r"data\.synthetic_tasks='sort,add,copy_edit'"):
    tokenizers.get_tokenizer(d, workdir)
  # The explicit path still loads it whatever the config says.
  d.tokenizer = str(tmp_path / "run" / tokenizers.TOKENIZER_FILENAME)
  assert tokenizers.get_tokenizer(d, workdir).vocab_size == 300


def test_bpe_reuse_of_file_without_request_record(tmp_path):
  texts = corpora.load_documents(_bpe_config(), "train")
  tokenizers.train_bpe(texts, 300, str(tmp_path / tokenizers.TOKENIZER_FILENAME))
  assert not (tmp_path / tokenizers.TOKENIZER_REQUEST_FILENAME).exists()
  # Older workdirs stay loadable when the size could be theirs...
  assert tokenizers.get_tokenizer(_bpe_config(300), str(tmp_path)).vocab_size == 300
  assert tokenizers.get_tokenizer(_bpe_config(320), str(tmp_path)).vocab_size == 300
  # ...but a file larger than requested cannot come from this request.
  with pytest.raises(ValueError, match=r"300 tokens but data\.bpe_vocab_size=280"):
    tokenizers.get_tokenizer(_bpe_config(280), str(tmp_path))


def test_bpe_request_record_contents(tmp_path):
  d = _bpe_config(300)
  tokenizers.get_tokenizer(d, str(tmp_path))
  record = json.loads((tmp_path / tokenizers.TOKENIZER_REQUEST_FILENAME).read_text())
  assert record == {"corpus": "synthetic", "bpe_vocab_size": 300,
                    "validation_fraction": 0.02, "max_bytes": 0,
                    "synthetic_tasks": "sort,add,copy_edit", "seed": 0,
                    "synthetic_digits": 5}


_INT_FIELDS = ("batch_size", "seq_len", "bpe_vocab_size", "max_bytes", "sft_max_examples",
               "long_context_min_length", "long_context_num_pairs", "sft_block_multiple",
               "synthetic_digits")


@pytest.mark.parametrize("name", _INT_FIELDS)
def test_bool_is_not_a_number(name):
  c = ml_collections.ConfigDict({"data": config_lib.default_data_config()})
  c.data[name] = True  # ml_collections lets a bool into an int field.
  assert c.data[name] is True
  with pytest.raises(ValueError, match=rf"data\.{name}\b"):
    config_lib.validate(c)


def test_bool_validation_fraction_refused():
  d = config_lib.default_data_config().to_dict()
  d["validation_fraction"] = True  # A config built from a dict keeps the bool.
  c = ml_collections.ConfigDict({"data": d})
  with pytest.raises(ValueError, match=r"data\.validation_fraction"):
    config_lib.validate(c)
  d["validation_fraction"] = 1
  config_lib.validate(ml_collections.ConfigDict({"data": d}))  # An int 1 is a number.


def test_integer_fields_still_accept_ints():
  c = ml_collections.ConfigDict({"data": config_lib.default_data_config()})
  c.data.max_bytes, c.data.sft_max_examples = 0, 0
  config_lib.validate(c)


@pytest.mark.parametrize("index", range(6))
def test_kv_recall_depth_one_is_right_before_question(index):
  tok = tokenizers.ByteTokenizer()
  hay = np.full(2000, ord("x"), np.int32)
  shortest = long_context.min_prompt_length("kv_recall", tok, 4) - 16
  # One haystack token: every other pair drawn at depth >= 0.5 ties with depth 1.
  ex = long_context.make_example("kv_recall", tok, hay, length=shortest + 1, depth=1.0,
                                 index=index, num_pairs=4)
  key = re.search(r'value of key "([0-9a-f]+)"', ex.prompt).group(1)
  question = f'\n\nWhat is the value of key "{key}"? The value is'
  needle = f'\n\nKey "{key}" has value "{ex.answer}".\n\n'
  assert ex.prompt.endswith(needle + question)
  assert ex.needle_end == ex.length - len(question)
  assert tok.decode(ex.prompt_ids[ex.needle_start:ex.needle_end]) == needle
  assert ex.measured_depth == 1.0 and long_context.solve(ex) == ex.answer
  ex0 = long_context.make_example("kv_recall", tok, hay, length=shortest + 1, depth=0.0,
                                  index=index, num_pairs=4)
  start = len("Key-value pairs are hidden in the text below. Remember them.\n\n")
  assert ex0.needle_start == start and ex0.measured_depth == 0.0


def test_long_context_bpe_exact_length_needle_and_answer():
  texts = corpora.load_documents(_bpe_config(), "train")
  tok = tokenizers.train_bpe(texts, 400)
  hay = long_context.load_haystack(tok, 600)
  for task in long_context.TASKS:
    shortest = long_context.min_prompt_length(task, tok, 3)
    for depth in (0.0, 0.5, 1.0):
      ex = long_context.make_example(task, tok, hay, length=shortest + 40, depth=depth,
                                     index=1, num_pairs=3)
      assert len(ex.prompt_ids) == shortest + 40
      assert tok.decode(ex.answer_ids) == ex.answer == long_context.solve(ex)
      assert ex.answer in tok.decode(ex.prompt_ids[ex.needle_start:ex.needle_end])
      assert abs(ex.measured_depth - depth) <= 0.5 / ex.haystack_tokens + 1e-12  # Ties round.
      assert long_context.exact_match(f" {ex.answer}<|eos|>tail", ex.answer)
    with pytest.raises(long_context.PromptTooShortError, match="too short"):
      long_context.make_example(task, tok, hay, length=20, depth=0.5, num_pairs=3)


def test_inference_reuses_the_runs_tokenizer_whatever_the_data_fields_now_say(
    tmp_path, monkeypatch, caplog):
  """Eval reads data.synthetic_digits / max_bytes on purpose; the trained run's tokenizer
  is still the one to use (training alone refuses a stale one)."""
  workdir = str(tmp_path / "run")
  d = _bpe_config(300)
  want = tokenizers.get_tokenizer(d, workdir)
  d.synthetic_digits, d.max_bytes = 8, 10_000
  with pytest.raises(ValueError, match=r"data\.synthetic_digits=5 \(config: 8\)"):
    tokenizers.get_tokenizer(d, workdir)
  with caplog.at_level("WARNING"):
    got = tokenizers.get_tokenizer(d, workdir, strict=False)
  np.testing.assert_array_equal(got.encode("sort: 3 1 2"), want.encode("sort: 3 1 2"))
  assert "synthetic_digits=5 (config: 8)" in caplog.text
  # load_for_inference builds its model that way (no checkpoint needed to see it).
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.config import base_config  # pylint: disable=g-import-not-at-top
  seen = {}

  def build_model(config, workdir, **kwargs):
    seen.update(kwargs)
    raise StopIteration  # Enough: the flag is what is checked.

  monkeypatch.setattr(inference.initial, "build_model", build_model)
  with pytest.raises(StopIteration):
    inference.load_for_inference(workdir, base_config())
  assert seen == {"strict_tokenizer": False}
