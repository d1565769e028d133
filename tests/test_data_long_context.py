"""Long-context tasks: exact lengths, needle depth, real-text haystack, determinism, scorer."""

import re

import numpy as np
import pytest

from blockdiff_jax.data import long_context as lc
from blockdiff_jax.data import tokenizers


@pytest.fixture(scope="module")
def byte_tok():
  return tokenizers.ByteTokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
  # A small BPE trained on the haystack text itself: multi-byte tokens everywhere.
  return tokenizers.train_bpe([lc.haystack_text(60_000)], vocab_size=600)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok_and_haystack(request, byte_tok, bpe_tok):
  tok = byte_tok if request.param == "byte" else bpe_tok
  return tok, lc.load_haystack(tok, 8192)


@pytest.mark.parametrize("task", lc.TASKS)
@pytest.mark.parametrize("length", [600, 1000, 4096])
def test_prompt_has_exactly_the_requested_length(tok_and_haystack, task, length):
  tok, hay = tok_and_haystack
  ex = lc.make_example(task, tok, hay, length=length, depth=0.3, seed=1, index=2)
  assert ex.prompt_ids.shape == (length,) and ex.prompt_ids.dtype == np.int32
  assert ex.length == length
  # The haystack fills the rest: instruction + needles + question + haystack.
  np.testing.assert_array_equal(ex.answer_ids, tok.encode(ex.answer))


@pytest.mark.parametrize("task", lc.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_sits_at_the_requested_depth(tok_and_haystack, task, depth):
  tok, hay = tok_and_haystack
  ex = lc.make_example(task, tok, hay, length=2000, depth=depth, seed=0, index=0)
  # Realised depth within one haystack token of the request.
  assert abs(ex.measured_depth - depth) <= 1.0 / ex.haystack_tokens
  # The span holds the queried needle, which names the answer.
  needle = tok.decode(ex.prompt_ids[ex.needle_start:ex.needle_end])
  assert ex.answer in needle
  if task == "kv_recall":
    key = lc._QUESTION_KEY_RE.findall(ex.prompt)[0]  # pylint: disable=protected-access
    assert f'Key "{key}" has value "{ex.answer}"' in needle
  # Depth in token positions: the needle starts after depth * haystack tokens plus the
  # instruction (and, for kv_recall, any pairs placed before it).
  instruction = len(tok.encode(lc._INSTRUCTION[task]))  # pylint: disable=protected-access
  assert ex.needle_start >= instruction + ex.haystack_before
  if task == "passkey":
    assert ex.needle_start == instruction + ex.haystack_before
  # An independent reader of the text finds the same answer.
  assert lc.solve(ex) == ex.answer


def test_depth_moves_the_needle_monotonically(byte_tok):
  hay = lc.load_haystack(byte_tok, 8192)
  starts = [lc.make_example("passkey", byte_tok, hay, length=3000, depth=d).needle_start
            for d in np.linspace(0, 1, 6)]
  assert starts == sorted(starts) and starts[-1] - starts[0] > 2500


def test_haystack_is_real_standard_library_text(byte_tok):
  hay = lc.load_haystack(byte_tok, 4096)
  text = lc.haystack_text(60_000)
  ex = lc.make_example("passkey", byte_tok, hay, length=3000, depth=0.5, seed=3)
  # The first 200 haystack characters after the instruction appear verbatim in the text.
  start = len(lc._INSTRUCTION["passkey"])  # pylint: disable=protected-access
  window = byte_tok.decode(ex.prompt_ids[start:start + 200])
  assert window in text
  assert "Return" in text or "return" in text  # Docstrings, not random tokens.
  source = lc.haystack_text(10_000, "source")
  assert "def " in source or "import " in source


def test_generation_is_deterministic_and_seeded(bpe_tok):
  hay = lc.load_haystack(bpe_tok, 4096)
  make = lambda **kw: lc.make_example("kv_recall", bpe_tok, hay, length=1500, depth=0.4,
                                      **kw)
  a, b = make(seed=7, index=3), make(seed=7, index=3)
  np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
  assert a.answer == b.answer and a.needle_start == b.needle_start
  others = [make(seed=7, index=4), make(seed=8, index=3)]
  for other in others:
    assert other.answer != a.answer
    assert not np.array_equal(other.prompt_ids, a.prompt_ids)


def test_kv_recall_keys_are_distinct_and_asked_once(byte_tok):
  hay = lc.load_haystack(byte_tok, 8192)
  ex = lc.make_example("kv_recall", byte_tok, hay, length=4000, depth=0.5, num_pairs=12)
  pairs = re.findall(r'Key "([0-9a-f]{8})" has value "([0-9a-f]{8})"', ex.prompt)
  assert len(pairs) == 12 and len({k for k, _ in pairs}) == 12
  assert ex.prompt.count(ex.answer) == 1


def test_suite_covers_every_cell(byte_tok):
  suite = lc.make_suite(byte_tok, lengths=[600, 1200], depths=[0.0, 1.0], per_cell=2)
  cells = {(e.task, e.length, e.depth) for e in suite}
  assert len(suite) == 2 * 2 * 2 * 2 and len(cells) == 8
  assert all(len(e.prompt_ids) == e.length for e in suite)


def test_scorer(byte_tok):
  suite = lc.make_suite(byte_tok, lengths=[400], depths=[0.0, 1.0], tasks=["passkey"])
  a0, a1 = suite[0].answer, suite[1].answer
  assert lc.exact_match(f" {a0}<|eos|>junk", a0)
  assert lc.exact_match(f"{a0}\n", a0)
  assert not lc.exact_match(f"{a0}0", a0)
  assert not lc.exact_match(f"key {a0}", a0)
  result = lc.score(suite, [a0, "wrong"])
  assert result["accuracy"] == 0.5 and result["n"] == 2
  assert [c["accuracy"] for c in result["cells"]] == [1.0, 0.0]
  assert lc.score(suite, [a0, a1])["accuracy"] == 1.0
  with pytest.raises(ValueError, match="2 examples but 1"):
    lc.score(suite, [a0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(task="needle"), "Unknown long-context task"),
    (dict(depth=1.5), "depth"),
    (dict(length=50), "length=50 is too short"),
    (dict(length=100_000), "haystack has"),
    (dict(num_pairs=0), "num_pairs"),
])
def test_bad_arguments_are_named(byte_tok, kwargs, match):
  hay = lc.load_haystack(byte_tok, 4096)
  args = dict(task="kv_recall", length=1000, depth=0.5) | kwargs
  task = args.pop("task")
  with pytest.raises(ValueError, match=match):
    lc.make_example(task, byte_tok, hay, **args)


@pytest.mark.parametrize("completion,hit", [
    (" 48213.\n", True), ("48213", True), (' "48213" is it', True), (" 482131", False),
    (" 4821", False), (" The pass key is 48213", False), ("48213<|eos|>junk", True)])
def test_answer_matches_needs_the_whole_answer_first(completion, hit):
  from blockdiff_jax.evaluation import long_context as lc_eval  # pylint: disable=g-import-not-at-top
  assert lc_eval.answer_matches(completion, "48213") is hit


@pytest.mark.parametrize("completion,score", [
    ("48213", 1.0), (" 48213<|eos|>", 1.0), ("48913", 0.8), ("4821", 0.8), ("82134", 0.0),
    ("", 0.0), ('"48200"', 0.6)])
def test_char_accuracy_credits_characters_in_place(completion, score):
  from blockdiff_jax.evaluation import long_context as lc_eval  # pylint: disable=g-import-not-at-top
  assert lc_eval.char_accuracy(completion, "48213") == pytest.approx(score)
  rows = [{"task": "passkey", "completion": completion, "answer": "48213"},
          {"task": "kv_recall", "completion": "x", "answer": "ab"}]
  assert lc_eval.char_rate(rows, task="passkey") == pytest.approx(score)
  assert lc_eval.char_rate(rows) == pytest.approx(score / 2)
  assert np.isnan(lc_eval.char_rate(rows, task="none"))


def test_char_position_rates_count_each_answer_position():
  from blockdiff_jax.evaluation import long_context as lc_eval  # pylint: disable=g-import-not-at-top
  rows = [{"task": "passkey", "completion": " 48913.", "answer": "48213"},
          {"task": "passkey", "completion": "4", "answer": "48213"},
          {"task": "kv_recall", "completion": '"ab"', "answer": "abc"}]
  assert lc_eval.char_position_rates(rows, task="passkey") == pytest.approx(
      [1.0, 0.5, 0.0, 0.5, 0.5])
  assert lc_eval.char_position_rates(rows, task="kv_recall") == pytest.approx([1, 1, 0])
  assert lc_eval.char_position_rates(rows, task="none") == []
  # The mean over positions of equal-length answers is char_rate.
  passkeys = [r for r in rows if r["task"] == "passkey"]
  assert np.mean(lc_eval.char_position_rates(passkeys)) == pytest.approx(
      lc_eval.char_rate(passkeys))


# ----------------------------------------------------- training stream (corpus=long_context)


def _dataset(tok, split="train", seq_len=512, block=16, **kw):
  from blockdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.LongContextDataset(lc.TASKS, tok, seq_len, 4, block, split=split, **kw)


@pytest.mark.parametrize("tok_name,block,score_prompt", [
    ("byte", 16, False), ("bpe", 8, False), ("byte", 8, True), ("bpe", 16, True)])
def test_training_rows_read_bos_prompt_sep_and_score_the_answer_blocks(
    byte_tok, bpe_tok, tok_name, block, score_prompt):
  tok = byte_tok if tok_name == "byte" else bpe_tok
  ds = _dataset(tok, block=block, score_prompt=score_prompt)
  lengths = set()
  for j in range(12):
    ex = ds.long_context_example(j)
    tokens, mask = ds.row(j)
    n = len(ex.prompt_ids) + 2
    lengths.add(ex.length)
    assert ds.min_length <= ex.length <= ds.max_length
    assert ex.task == lc.TASKS[j % 2]
    np.testing.assert_array_equal(tokens[:n], [tok.bos_id, *ex.prompt_ids, tok.sep_id])
    a = len(ex.answer_ids)
    np.testing.assert_array_equal(tokens[n:n + a], ex.answer_ids)
    assert (tokens[n + a:] == tok.eos_id).all()
    # Scored (and maskable): the answer, its EOS and the rest of that EOS's block; with
    # score_prompt also everything before it but BOS.
    end = -(-(n + a + 1) // block) * block
    np.testing.assert_array_equal(np.nonzero(mask)[0], np.arange(1 if score_prompt else n, end))
    assert lc.solve(ex) == ex.answer  # The needle really is in the prompt.
  assert len(lengths) > 6  # Lengths are drawn, not fixed.


def test_training_streams_are_deterministic_and_disjoint(byte_tok):
  train, again, val = _dataset(byte_tok), _dataset(byte_tok), _dataset(byte_tok, "validation")
  np.testing.assert_array_equal(train.get_batch(3)["tokens"], again.get_batch(3)["tokens"])
  answers = {train.long_context_example(j).answer for j in range(40)}
  assert not answers & {val.long_context_example(j).answer for j in range(40)}
  suite = lc.make_suite(byte_tok, lengths=[480, 1024], depths=[0.1, 0.5, 0.9], per_cell=4)
  assert not answers & {e.answer for e in suite}  # Evaluation needles are unseen.


def test_training_stream_names_a_row_too_short_for_the_tasks(byte_tok):
  with pytest.raises(ValueError, match="long_context_min_length.*raise data.seq_len"):
    _dataset(byte_tok, seq_len=256, num_pairs=8)
  assert _dataset(byte_tok, seq_len=256, num_pairs=2).min_length >= lc.min_prompt_length(
      "kv_recall", byte_tok, 2)


def test_data_config_routes_and_validates_the_long_context_corpus(byte_tok):
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.data.corpus, c.data.seq_len, c.data.sft_block_multiple = "long_context", 512, 16
  c.data.long_context_tasks = "passkey"
  ds = pipeline.build_dataset(c.data, byte_tok, "validation", 512, 2, 0)
  assert isinstance(ds, pipeline.LongContextDataset) and ds.tasks == ("passkey",)
  c.data.long_context_tasks = "passkey,needle"
  with pytest.raises(ValueError, match="long_context_tasks: unknown task 'needle'"):
    data_config.validate(c)
