"""Hardening of the data pipeline: batches hold exactly what the docstrings say.

Packers are checked against slow pure-Python packers written from the docstrings of
``data.pipeline`` and ``data.sft``; resumes against an uninterrupted run; the
long-context stream against prompts whose keys tokenize to varying lengths.
"""

import hashlib
import json
import math

import ml_collections
import numpy as np
import pytest

from blockdiff_jax.data import config as config_lib
from blockdiff_jax.data import corpora
from blockdiff_jax.data import long_context
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers

BYTE = tokenizers.ByteTokenizer()
# Empty documents, multi-byte text, a document longer than any window.
DOCS = ["", "alpha beta", "héllo wörld ✓ 日本", "", "x" * 29, "b", "üñí\ncode = 1\n"]


def _reference_windows(docs, tok, seq_len):
  """(tokens, segment ids) of every window: BOS doc EOS concatenated, tail dropped."""
  stream, doc_of = [], []
  for d, text in enumerate(docs):
    ids = [tok.bos_id, *tok.encode(text).tolist(), tok.eos_id]
    stream += ids
    doc_of += [d] * len(ids)
  windows = []
  for w in range(len(stream) // seq_len):
    toks = stream[w * seq_len:(w + 1) * seq_len]
    docs_in = doc_of[w * seq_len:(w + 1) * seq_len]
    windows.append((toks, [d - docs_in[0] for d in docs_in]))
  return windows


@pytest.mark.parametrize("seq_len,batch_size,shuffle", [(7, 3, True), (16, 2, False),
                                                         (5, 4, True)])
def test_packed_lm_batches_match_a_slow_reference_packer(seq_len, batch_size, shuffle):
  ds = pipeline.PackedLMDataset(DOCS, BYTE, seq_len, batch_size, seed=5, shuffle=shuffle)
  windows = _reference_windows(DOCS, BYTE, seq_len)
  assert ds.num_windows == len(windows)
  # Past one epoch, so the last partial batch spills into the next epoch's order.
  for index in range(2 * len(windows) // batch_size + 2):
    batch = ds.get_batch(index)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((batch_size, seq_len), np.int32),
        "segment_ids": ((batch_size, seq_len), np.int32),
        "loss_mask": ((batch_size, seq_len), np.float32)}
    for b in range(batch_size):
      epoch, pos = divmod(index * batch_size + b, len(windows))
      w = np.random.default_rng([5, epoch]).permutation(len(windows))[pos] if shuffle else pos
      toks, segs = windows[w]
      assert batch["tokens"][b].tolist() == toks
      assert batch["segment_ids"][b].tolist() == segs
      assert batch["loss_mask"][b].tolist() == [float(t != BYTE.bos_id) for t in toks]


def _reference_sft_rows(examples, done, seq_len, multiple, eos, score_padding):
  """Greedy in-order packing of (head, body) pairs, from the data.sft docstring."""
  rows, row, kept = [], [], []
  for i, ((head, body), finished) in enumerate(zip(examples, done)):
    toks = list(head) + list(body)
    if finished:
      scored = len(toks) if not score_padding else None
      toks += [eos] * (-len(toks) % multiple)
      scored = len(toks) if scored is None else scored
    else:  # Cut back to the last block boundary, no EOS.
      toks = toks[:len(toks) // multiple * multiple]
      scored = len(toks)
    if len(toks) > seq_len or scored <= len(head):
      continue
    kept.append(i)
    example = [(t, float(len(head) <= p < scored)) for p, t in enumerate(toks)]
    if sum(len(e) for e in row) + len(example) > seq_len:
      rows.append(row)
      row = []
    row.append(example)
  rows.append(row)
  out = []
  for row in rows:
    cells = [(t, m, s) for s, e in enumerate(row) for t, m in e]
    cells += [(eos, 0.0, -1)] * (seq_len - len(cells))  # The tail: padding.
    out.append(tuple(list(c) for c in zip(*cells)))
  return out, kept


@pytest.mark.parametrize("score_padding", [True, False])
def test_packed_sft_rows_match_a_slow_reference_packer(score_padding):
  records = [("q", "short answer"), ("a much longer prompt here", "r"), ("p", ""),
             ("x" * 70, "too long for a row"), ("cut", "an unfinished answer", False),
             ("c", "ab", False), ("two", "blocks of response text")]
  seq_len, multiple = 48, 8
  ds = pipeline.PackedSFTDataset(records, BYTE, seq_len, 2, multiple, shuffle=False,
                                 score_padding=score_padding)
  examples = [sft.render(BYTE, r) for r in records]
  for (head, body), r in zip(examples, records):  # BOS prompt SEP | response [EOS].
    assert BYTE.decode(head, skip_special=False) == f"<|bos|>{r[0]}<|sep|>"
    assert BYTE.decode(body, skip_special=False) == r[1] + ("<|eos|>" if len(r) == 2 else "")
  want, kept = _reference_sft_rows(examples, [len(r) == 2 for r in records], seq_len,
                                   multiple, BYTE.eos_id, score_padding)
  assert ds.kept == kept == [0, 1, 2, 4, 6]
  assert ds.num_rows == len(want)
  for j, (toks, mask, segs) in enumerate(want):
    batch = ds.get_batch(j // 2)
    assert batch["tokens"][j % 2].tolist() == toks
    assert batch["loss_mask"][j % 2].tolist() == mask
    assert batch["segment_ids"][j % 2].tolist() == segs
    starts = [p for p in range(seq_len) if p == 0 or segs[p] != segs[p - 1]]
    assert all(p % multiple == 0 for p in starts)  # Every example starts on a block.


class HexHeavyTokenizer(tokenizers.ByteTokenizer):
  """Bytes, plus three marker tokens after each of a-f.

  Like a BPE vocabulary, it gives random hex keys token counts that vary from key to
  key, so a long-context prompt's fixed parts vary from example to example.
  """

  MARKER = 1

  def encode(self, text):
    out = []
    for b in text.encode("utf-8"):
      out += [b] + [self.MARKER] * 3 * (b in b"abcdef")
    return np.asarray(out, np.int32)

  def decode(self, ids, skip_special=True):
    ids = np.asarray(ids)
    return super().decode(ids[ids != self.MARKER], skip_special)


@pytest.fixture(scope="module")
def long_context_stream():
  tok = HexHeavyTokenizer()
  shortest = long_context.min_prompt_length("kv_recall", tok, 4)
  block = 16
  room = pipeline.LongContextDataset.ANSWER_ROOM
  seq_len = -(-(shortest + 40 + room) // block) * block  # Lengths span >= 40 tokens.
  return tok, shortest, seq_len, block


def test_long_context_stream_fits_every_example_in_its_length_range(long_context_stream):
  tok, shortest, seq_len, block = long_context_stream
  # The shortest prompt the config check allows: examples whose keys take more tokens
  # than the probe's used to fail here or at some later step of the run.
  ds = pipeline.LongContextDataset(["kv_recall"], tok, seq_len, 4, block, seed=3,
                                   min_length=shortest, num_pairs=4)
  lo, hi = ds.min_length, ds.max_length
  moved = 0
  for j in range(48):
    ex = ds.long_context_example(j)
    rng = np.random.default_rng([3, 0, j])  # The documented draw of length and depth.
    drawn, depth = int(rng.integers(lo, hi + 1)), float(rng.uniform(0.0, 1.0))
    assert lo <= ex.length <= hi and len(ex.prompt_ids) == ex.length
    again = long_context.make_example("kv_recall", tok, ds.haystack, length=ex.length,
                                      depth=depth, seed=long_context.TRAINING_SEED_BASE + 6,
                                      index=j, num_pairs=4)
    assert np.array_equal(again.prompt_ids, ex.prompt_ids)
    moved += ex.length != drawn
    # Needle where asked, answer exact after a round trip, from the prompt text alone.
    assert ex.haystack_before == round(depth * ex.haystack_tokens)
    assert tok.decode(ex.prompt_ids[ex.needle_start:ex.needle_end]) == (
        f'\n\nKey "{ex.prompt.split(chr(34))[-2]}" has value "{ex.answer}".\n\n')
    assert long_context.solve(ex) == ex.answer == tok.decode(ex.answer_ids)
    tokens, mask = ds.row(j)
    end = ex.length + 2 + len(ex.answer_ids)  # BOS prompt SEP answer, then EOS.
    assert tokens[end] == tok.eos_id and tokens[ex.length + 1] == tok.sep_id
    assert np.flatnonzero(mask).tolist() == list(
        range(ex.length + 2, min(-(-(end + 1) // block) * block, seq_len)))
  assert moved  # Some example did outgrow its drawn length.


def test_long_context_no_fitting_length_is_an_error_naming_the_fields():
  tok = HexHeavyTokenizer()
  haystack = long_context.load_haystack(tok, 2048)
  # Below the fixed parts of every example (about 475 tokens).
  with pytest.raises(ValueError, match="long_context_min_length"):
    long_context.training_example(["kv_recall"], tok, haystack, index=0, split="train",
                                  seed=0, min_length=330, max_length=340, num_pairs=4)


def _datasets():
  """One small dataset of each kind, rebuilt from scratch on every call."""
  records = [(f"prompt {i}", "answer " * (i % 4)) for i in range(23)]
  return {
      "packed_lm": pipeline.PackedLMDataset(DOCS * 3, BYTE, 9, 3, seed=2),
      "packed_sft": pipeline.PackedSFTDataset(records, BYTE, 32, 3, 8, seed=2),
      "synthetic": pipeline.SyntheticDataset(["add", "sort"], BYTE, 32, 3, seed=2),
  }


def test_resume_at_step_k_sees_the_uninterrupted_batches():
  steps, k = 12, 7
  uninterrupted = {}
  for name, ds in _datasets().items():
    it = ds.iterator(0)
    uninterrupted[name] = [next(it) for _ in range(steps)]
  for name, ds in _datasets().items():
    first = ds.iterator(0)
    for _ in range(k):
      next(first)
    saved = json.loads(json.dumps(first.get_state()))  # As a checkpoint stores it.
    pipeline._permutation.cache_clear()  # A new process has no cached permutation.
    resumed = _datasets()[name].iterator(0)
    resumed.set_state(saved)
    for step in range(k, steps):
      got, want = next(resumed), uninterrupted[name][step]
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {step} {key}")


def test_negative_seeds_are_refused_when_the_dataset_is_built():
  with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
    pipeline.PackedLMDataset(DOCS, BYTE, 4, 2, seed=-1)
  with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
    pipeline.PackedSFTDataset([("q", "a")], BYTE, 16, 2, 8, seed=-1)
  with pytest.raises(ValueError, match="seed must be an int >= 0, got -2"):
    pipeline.SFTDataset(lambda j: ("q", "a"), BYTE, 16, 2, seed=-2)
  data = config_lib.default_data_config()
  data.seed = -1
  with pytest.raises(ValueError, match="data.seed must be an integer >= 0, got -1"):
    config_lib.validate(ml_collections.ConfigDict({"data": data}))


def test_split_of_holds_out_the_documented_share_in_rounded_up_steps_of_a_thousandth():
  keys = [f"pkg/module_{i}.py" for i in range(4000)]
  buckets = np.array([int(hashlib.sha1(k.encode()).hexdigest(), 16) % 1000 for k in keys])
  for fraction in (0.0, 0.0001, 0.0015, 0.02, 0.07, 0.29, 1.0):
    held = np.array([corpora.split_of(k, fraction) == "validation" for k in keys])
    np.testing.assert_array_equal(held, buckets < math.ceil(round(1000 * fraction, 9)))


@pytest.fixture(scope="module")
def bpe():
  texts = ["def f(x):\n  return x + 1\n", "héllo wörld ✓ 日本語 😀", "<|eos|> is text"] * 20
  return tokenizers.train_bpe(texts, 300)


def test_tokenizers_round_trip_arbitrary_text_and_never_emit_specials(bpe):
  rng = np.random.default_rng(0)
  # Code points from every UTF-8 length, control characters and the specials' spelling.
  points = np.concatenate([rng.integers(0, 0x80, 400), rng.integers(0x80, 0xD800, 300),
                           rng.integers(0xE000, 0x110000, 300)])
  texts = ["".join(map(chr, rng.choice(points, int(n)))) for n in rng.integers(0, 40, 40)]
  texts += ["".join(tokenizers.SPECIAL_TOKEN_NAMES), "a<|eos|>b<|bos|>", "\r\n\t \x00"]
  for tok in (BYTE, bpe):
    ids = tok.encode_batch(texts)
    for text, got in zip(texts, ids):
      np.testing.assert_array_equal(got, tok.encode(text))
      assert not tok.is_special(got).any(), (tok, text)
      assert tok.decode(got, skip_special=False) == text
  assert BYTE.encode("é<|eos|>").tolist() == list("é<|eos|>".encode())
