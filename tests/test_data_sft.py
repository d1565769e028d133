"""SFT data: JSONL/chat rendering, loss masks, block-aligned packing, held-out split."""

import json

import ml_collections
import numpy as np
import pytest

from blockdiff_jax.data import config as data_config_lib
from blockdiff_jax.data import corpora
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers

BYTE = tokenizers.ByteTokenizer()


class ChatTokenizer(tokenizers.ByteTokenizer):
  """A byte tokenizer with a chat template (as interop's PretrainedTokenizer has)."""

  def apply_chat_template(self, messages, add_generation_prompt=True):
    text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


def _write(tmp_path, lines):
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return str(path)


@pytest.mark.parametrize("multiple,seq_len", [(8, 64), (16, 64), (32, 128)])
@pytest.mark.parametrize("tok", [BYTE, ChatTokenizer()], ids=["plain", "chat"])
def test_packed_rows_mark_responses_and_align_examples_to_blocks(tmp_path, multiple, seq_len,
                                                                 tok):
  lines = [{"prompt": f"q{i}?" * (i % 3 + 1), "response": f"answer {i}" * (i % 2 + 1)}
           for i in range(7)]
  lines.append({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello there"}]})
  records = sft.jsonl_records(_write(tmp_path, lines))
  ds = pipeline.PackedSFTDataset(records, tok, seq_len, 2, multiple, shuffle=False,
                            score_padding=False)
  rows = ds.rows
  # Rebuild every example from the packed rows and check it against its rendering.
  found = 0
  for toks, loss, seg in zip(rows["tokens"], rows["loss_mask"], rows["segment_ids"]):
    for s in np.unique(seg):
      at = np.nonzero(seg == s)[0]
      assert at[0] % multiple == 0 and len(at) % multiple == 0
      if not loss[at].any():
        continue  # The row's tail padding.
      head, body = sft.render(tok, records[found])
      np.testing.assert_array_equal(toks[at][:len(head)], head)
      np.testing.assert_array_equal(toks[at][len(head):len(head) + len(body)], body)
      want = np.zeros(len(at))
      want[len(head):len(head) + len(body)] = 1
      np.testing.assert_array_equal(loss[at], want)
      found += 1
  assert found == len(records) and ds.dropped == 0
  if isinstance(tok, ChatTokenizer):
    assert b"<assistant>" in bytes(rows["tokens"][0][rows["tokens"][0] < 256].astype(np.uint8))
  batch = ds.get_batch(3)
  assert batch["tokens"].shape == (2, seq_len) and batch["loss_mask"].dtype == np.float32


def test_score_padding_and_too_long_examples_dropped():
  recs = [("p", "r" * 5), ("p", "x" * 100)]
  rows, dropped = sft.pack([sft.render(BYTE, r) for r in recs], 16, 8, BYTE.eos_id, True)
  assert dropped == 1
  head, body = sft.render(BYTE, recs[0])
  np.testing.assert_array_equal(rows["loss_mask"][0][:16], [0] * len(head) + [1] * (16 - len(head)))


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize("score_padding", [True, False])
def test_unfinished_responses_get_no_eos_and_end_on_a_block_boundary(tmp_path, multiple,
                                                                      score_padding):
  """A response marked "finished": false (cut at a limit) is never taught to end: no EOS,
  no padding, cut back to the last block boundary; one with nothing left is dropped."""
  lines = [{"prompt": "q0?", "response": "a finished answer"},
           {"prompt": "q1?", "response": "an answer cut at the limit", "finished": False},
           {"messages": [{"role": "user", "content": "q2?"},
                         {"role": "assistant", "content": "cut chat answer"}],
            "finished": False},
           {"prompt": "a much longer question?", "response": "x", "finished": False}]
  records = sft.jsonl_records(_write(tmp_path, lines))
  assert [sft.finished(r) for r in records] == [True, False, False, False]
  ds = pipeline.PackedSFTDataset(records, BYTE, 64, 2, multiple, shuffle=False,
                                 score_padding=score_padding)
  # Slow reference: each kept example's segment, written out from the definition.
  want = []
  for i, (prompt, response) in enumerate([("q0?", "a finished answer"),
                                          ("q1?", "an answer cut at the limit"),
                                          ("q2?", "cut chat answer"),
                                          ("a much longer question?", "x")]):
    head = list(sft.render(BYTE, (prompt, ""))[0])
    body = list(BYTE.encode(response))
    if i == 0:
      body.append(BYTE.eos_id)
      n = len(head) + len(body)
      toks = head + body + [BYTE.eos_id] * (-n % multiple)
      loss = [0] * len(head) + [1] * (len(toks) - len(head) if score_padding else len(body))
      loss += [0] * (len(toks) - len(loss))
    else:
      toks = (head + body)[:(len(head) + len(body)) // multiple * multiple]
      loss = [0] * len(head) + [1] * (len(toks) - len(head))
      if len(toks) <= len(head):
        continue  # Nothing of the response before the boundary.
    want.append((toks, loss))
  assert ds.dropped == 4 - len(want) >= 1
  got = []
  for toks, loss, seg in zip(ds.rows["tokens"], ds.rows["loss_mask"], ds.rows["segment_ids"]):
    for s in np.unique(seg):
      at = np.nonzero(seg == s)[0]
      if loss[at].any():
        got.append((toks[at].tolist(), loss[at].astype(int).tolist()))
  assert got == want
  for toks, _ in got[1:]:
    assert BYTE.eos_id not in toks and len(toks) % multiple == 0


def test_bad_records_name_the_line(tmp_path):
  path = _write(tmp_path, [{"prompt": "a", "response": "b"}, {"question": "a"}])
  with pytest.raises(ValueError, match="sft.jsonl:2.*'prompt' and 'response'"):
    sft.jsonl_records(path)
  path = _write(tmp_path, [{"prompt": "a", "response": "b", "finished": "no"}])
  with pytest.raises(ValueError, match="sft.jsonl:1.*'finished' must be true or false"):
    sft.jsonl_records(path)
  with pytest.raises(ValueError, match="no such JSONL"):
    sft.jsonl_records(str(tmp_path / "missing.jsonl"))


GOOD_LINE = b'{"prompt": "hi", "response": "there"}\n'
# (second line of the file, what the error must say after "sft.jsonl:2: ").
BAD_LINES = [
    (b'{"prompt": "a", "response": \n', r"invalid JSON"),
    (b'{"prompt": "caf\xe9", "response": "x"}\n', r"not a UTF-8 text file.*data\.sft_source"),
    (b"[1, 2]\n", r"expected a JSON object.*got list"),
    (b'"just a string"\n', r"expected a JSON object.*got str"),
    (b'{"messages": "hello"}\n', r"'messages' must be a non-empty list"),
    (b'{"messages": []}\n', r"'messages' must be a non-empty list"),
    (b'{"messages": ["user", "assistant"]}\n', r"messages\[0\] must be an object"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}\n',
     r"messages\[0\] \(user\) has no 'content'"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n',
     r"messages\[1\] \(assistant\) has no 'content'"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}\n',
     r"messages\[0\]\.content must be a string, got int"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", '
     b'"content": "yo"}]}\n', r"messages\[0\] has role 'wizard'; allowed: system, user, assistant, tool"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', r"'messages' must end with an assistant"),
    (b'{"prompt": "x\\ud800", "response": "y"}\n', r"'prompt' holds a lone surrogate"),
    (b'{"prompt": "q", "response": "\\udfff"}\n', r"'response' holds a lone surrogate"),
    (b'{"prompt": null, "response": "5"}\n', r"'prompt' must be a string, got NoneType"),
    (b'{"prompt": "q", "response": 5}\n', r"'response' must be a string, got int"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_jsonl_lines_are_refused_naming_path_and_line(tmp_path, line, message):
  path = tmp_path / "sft.jsonl"
  path.write_bytes(GOOD_LINE + line + GOOD_LINE)
  with pytest.raises(ValueError, match=rf"sft\.jsonl:2: {message}"):
    sft.jsonl_records(str(path))


def test_a_byte_order_mark_and_blank_lines_are_accepted(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE + b"\n  \n" + GOOD_LINE.replace(b"\n", b"\r\n")
                   + b'{"messages": [{"role": "system", "content": "s"}, {"role": "tool", '
                   b'"content": "t"}, {"role": "assistant", "content": "a"}]}\n')
  records = sft.jsonl_records(str(path))
  assert records[:2] == [("hi", "there")] * 2 and records[2][-1]["content"] == "a"


def _long_and_short(tmp_path, n_short=1, n_long=3):
  lines = ([{"prompt": f"q{i}", "response": "short"} for i in range(n_short)]
           + [{"prompt": f"l{i}", "response": "x" * 200} for i in range(n_long)])
  d = data_config_lib.default_data_config()
  d.corpus, d.sft_source, d.validation_fraction = "sft", _write(tmp_path, lines), 0.0
  d.sft_block_multiple = 8
  return d


def test_dropped_examples_are_reported_and_left_out_of_the_stats(tmp_path, capsys):
  d = _long_and_short(tmp_path)
  ds = pipeline.build_dataset(d, BYTE, "train", 64, 2, seed=0)
  assert "sft train: 3/4 examples dropped" in capsys.readouterr().out
  assert ds.dropped == 3 and ds.kept == [0]
  # Only the kept response ("short") is measured: 5 bytes, 5 byte tokens.
  assert (ds.stats.num_bytes, ds.stats.num_tokens) == (5, 5)


def test_a_split_with_no_example_that_fits_names_seq_len(tmp_path):
  d = _long_and_short(tmp_path, n_short=0)
  with pytest.raises(ValueError, match=r"SFT train split: none of its 3 examples fits in "
                                       r"data\.seq_len=64"):
    pipeline.build_dataset(d, BYTE, "train", 64, 2, seed=0)


def test_docstring_source_split_is_deterministic_disjoint_and_by_prompt_hash():
  train = sft.load_records("docstrings", "train", 0.1, 300)
  val = sft.load_records("docstrings", "validation", 0.1, 30)
  assert train == sft.load_records("docstrings", "train", 0.1, 300)
  assert not {p for p, _ in train} & {p for p, _ in val}
  for p, a in val:
    assert corpora.split_of(p, 0.1) == "validation" and p.startswith("What does") and a


@pytest.mark.parametrize("cap", [3, 5])
def test_mixed_sources_interleave_each_capped(tmp_path, cap):
  """Named sources and the JSONL files each give `cap` records, round-robin."""
  path = _write(tmp_path, [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)])
  jsonl = sft.load_records(path, "train", 0.1, cap)
  synth = sft.load_records("synthetic", "train", 0.0, cap)
  docs = sft.load_records("docstrings", "train", 0.1, cap)
  assert sft.source_groups(f"synthetic,{path},docstrings,synthetic") == [
      "synthetic", "docstrings", path]
  mixed = sft.load_records(f"synthetic,{path},docstrings", "train", 0.1, cap)
  expect = [r for trio in zip(synth, docs, jsonl) for r in trio]
  assert mixed == expect and len(mixed) == 3 * cap
  # An uneven mix: the longer source's tail follows the round-robin part.
  short = _write(tmp_path, [{"prompt": "only", "response": "one"}])
  assert sft.load_records(f"synthetic,{short}", "train", 0.0, cap) == (
      [synth[0], ("only", "one")] + synth[1:])
  with pytest.raises(ValueError, match="names no source"):
    sft.load_records(" , ", "train", 0.0, cap)


def test_build_dataset_sft_corpus_synthetic_source():
  d = data_config_lib.default_data_config()
  d.corpus, d.sft_source, d.sft_max_examples, d.sft_block_multiple = "sft", "synthetic", 50, 8
  ds = pipeline.build_dataset(d, BYTE, "train", 64, 4, seed=0)
  assert isinstance(ds, pipeline.PackedSFTDataset)
  b = ds.get_batch(0)
  np.testing.assert_array_equal(b["tokens"], ds.get_batch(0)["tokens"])
  assert b["loss_mask"].sum() > 0 and (b["loss_mask"] < 1).any()
  c = ml_collections.ConfigDict({"data": d})
  c.data.seq_len = 60
  with pytest.raises(ValueError, match="sft_block_multiple"):
    data_config_lib.validate(c)


@pytest.mark.parametrize("record", [("What is 2+2?", "4"),
                                    [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello."}]])
def test_chat_template_specials_become_their_ids(record):
  """The rendered prompt holds <|im_start|> as its one special id, exactly the ids a chat
  prompt gets at sampling time, never the characters '<', '|', 'im'..."""
  from blockdiff_jax.interop import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.qwen_tokenizer("qwen3")
  head, body = sft.render(tok, record)
  messages = (record[:-1] if isinstance(record, list)
              else [{"role": "user", "content": record[0]}])
  text = tok.apply_chat_template(messages, add_generation_prompt=True)
  im_start = tok.encode_with_specials("<|im_start|>")
  assert len(im_start) == 1
  assert head.tolist() == tok.encode_with_specials(text).tolist()
  assert head[0] == im_start[0] and np.sum(head == im_start[0]) == len(messages) + 1
  assert tok.decode(head, skip_special=False) == text
  assert body[-1] == tok.eos_id
