"""Hardening of SFT data: docstring answers, the docstring held-out split, chat flags.

A tiny standard library written by each test stands in for the real one, so the
references (the sentences a docstring was built from, a sha1 split computed here, the
raw bytes of the response) are known independently of ``data.sft``.
"""

import hashlib
import json

import numpy as np
import pytest

from blockdiff_jax.data import corpora
from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers

BYTE = tokenizers.ByteTokenizer()


def _prompt(module, name, args="x"):
  return f"What does the Python standard library function `{module}.{name}({args})` do?"


def _write_module(root, name, functions):
  """Writes ``name.py`` with one ``def f(x)`` per (function name, docstring)."""
  body = "".join(f"def {fn}(x):\n  {json.dumps(doc)}\n\n\n" for fn, doc in functions)
  (root / f"{name}.py").write_text(body)


def test_long_docstring_answers_end_at_their_last_whole_sentence(tmp_path):
  """A first paragraph over MAX_DOC_CHARS is cut after a sentence, never mid-word (it
  is trained with EOS after it); one with no sentence end inside the limit is left out."""
  sentences = [f"Sentence {i} says pi is 3.14 and more words follow here to fill it up."
               for i in range(12)]
  assert len(" ".join(sentences)) > sft.MAX_DOC_CHARS
  # Reference: the most whole sentences that fit, counted from the sentences themselves.
  n = max(k for k in range(len(sentences) + 1)
          if len(" ".join(sentences[:k])) <= sft.MAX_DOC_CHARS)
  short = "Return the argument unchanged, as the identity does."
  # Each sentence on its own line, as docstrings wrap: the answer joins them with spaces.
  _write_module(tmp_path, "mod", [
      ("long", "\n".join(sentences) + "\n\nSecond paragraph."),
      ("run_on", "word " * 200),
      ("short", short)])
  pairs = list(sft.docstring_pairs(str(tmp_path)))
  assert pairs == [(_prompt("mod", "long"), " ".join(sentences[:n])),
                   (_prompt("mod", "short"), short)]


def test_docstring_validation_leaves_out_answers_trained_on(tmp_path, monkeypatch):
  """Modules that share a docstring (ntpath/posixpath): a validation pair whose answer a
  train pair has is left out, so validation scores only unseen answers; train is the
  plain prompt-hash split."""
  fraction = 0.3
  docs = [f"Return the {w} part of a path, as the other module does too." for w in
          ("first", "second", "third", "fourth", "fifth", "sixth")]
  for module in ("alpha", "beta", "gamma"):
    _write_module(tmp_path, module, [(f"f{i}", d) for i, d in enumerate(docs)]
                  + [(f"own{i}", f"A function only {module} has, number {i}.")
                     for i in range(6)])
  monkeypatch.setattr(corpora, "stdlib_root", lambda: str(tmp_path))
  pairs = [(_prompt(m, f"f{i}"), d) for m in ("alpha", "beta", "gamma")
           for i, d in enumerate(docs)]
  pairs += [(_prompt(m, f"own{i}"), f"A function only {m} has, number {i}.")
            for m in ("alpha", "beta", "gamma") for i in range(6)]
  held = lambda p: int(hashlib.sha1(p.encode()).hexdigest(), 16) % 1000 < 1000 * fraction
  train = [(p, a) for p, a in pairs if not held(p)]
  seen = {a for _, a in train}
  validation = [(p, a) for p, a in pairs if held(p) and a not in seen]
  leaked = [(p, a) for p, a in pairs if held(p) and a in seen]
  assert leaked and validation  # The case exists in this tiny library.
  got_train = sft.load_records("docstrings", "train", fraction, 0)
  got_val = sft.load_records("docstrings", "validation", fraction, 0)
  assert sorted(got_train) == sorted(train)
  assert sorted(got_val) == sorted(validation)
  assert sft.load_records("docstrings", "validation", fraction, 1) == got_val[:1]


@pytest.mark.parametrize("flag, ok", [("false", False), (0, False), (None, False),
                                      (False, True), (True, True)])
def test_a_response_message_finished_flag_must_be_a_boolean(tmp_path, flag, ok):
  """"finished": "false" on the response message used to count as true (EOS added)."""
  rec = {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "cut off mid", "finished": flag}]}
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(rec) + "\n")
  if not ok:
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: messages\[1\]\.finished must be "
                                         r"true or false"):
      sft.jsonl_records(str(path))
    return
  record = sft.jsonl_records(str(path))[1]
  head, body = sft.render(BYTE, record)
  # Reference: the raw bytes, with EOS only when the response ended.
  want = list(b"cut off mid") + ([BYTE.eos_id] if flag else [])
  assert body.tolist() == want and sft.finished(record) is flag
  np.testing.assert_array_equal(head, [BYTE.bos_id, *b"q", BYTE.sep_id])



def test_empty_user_files_hold_no_document_and_an_all_empty_split_names_the_paths(tmp_path):
  """An empty file reached the statistics as a document of zero tokens ("No tokens in 1
  texts"), naming neither the file nor the field."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.data import corpora  # pylint: disable=g-import-not-at-top
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "words.txt").write_text("some words")
  cfg = ml_collections.ConfigDict(dict(corpus="files", paths=str(tmp_path / "*.txt"),
                                       validation_fraction=0.0, max_bytes=0,
                                       text_field="text"))
  assert corpora.load_documents(cfg, "train") == ["some words"]
  cfg.paths = str(tmp_path / "empty.txt")
  with pytest.raises(ValueError, match=r"empty .*data\.paths='.*empty\.txt'"):
    corpora.load_documents(cfg, "train")
