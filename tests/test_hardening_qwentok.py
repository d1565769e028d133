"""Added tokens that are not special (Qwen's FIM, tool and think tokens) behave as in
transformers: matched whole in text, kept by decode(skip_special), not is_special; and
prompts can still name them as markers."""

import json
import os
import time

import numpy as np
import pytest
import tokenizers as hf_tokenizers

from blockdiff_jax.data import tokenizers as data_tokenizers
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.sampling import layout

transformers = pytest.importorskip("transformers")

# Qwen2.5/Qwen3's published tokenizer.json: ids 151643-151656 are "special": true, the
# tool/FIM/repo/think tokens after them "special": false; tokenizer_config.json lists the
# 13 specials besides <|endoftext|> as additional_special_tokens.
_PUBLISHED_SPECIAL = range(151643, 151657)
_TEXTS = ["<|fim_prefix|>def f(x):<|fim_suffix|>\n    return y<|fim_middle|>",
          "<|repo_name|>proj\n<|file_sep|>a.py\nx = 1 <tool_call>{}</tool_call>",
          "<|im_start|>user\nhi<|im_end|>\n<think>\nok</think><|endoftext|>",
          "plain text, caf\u00e9 \u4e2d\u6587 <|fim_pad|><tool_response>"]


@pytest.fixture(scope="module")
def qwen3():
  return tokenizer_lib.qwen_tokenizer("qwen3")


@pytest.fixture(scope="module")
def qwen_reference(qwen3, tmp_path_factory):
  """transformers' tokenizer of a tokenizer.json with Qwen3's published added tokens."""
  path = str(tmp_path_factory.mktemp("qwen_ref") / "tokenizer.json")
  # Only the added_tokens list is parsed and rewritten (the 150k vocabulary is slow).
  head, sep, tail = qwen3.hf_tokenizer.to_str().partition(',"normalizer"')
  start, key, added = head.partition('"added_tokens":')
  added = json.loads(added)
  for a in added:
    a["special"] = a["id"] in _PUBLISHED_SPECIAL
  with open(path, "w", encoding="utf-8") as f:
    f.write(start + key + json.dumps(added) + sep + tail)
  names = tokenizer_lib.QWEN_SPECIALS
  return transformers.PreTrainedTokenizerFast(
      tokenizer_file=path, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=list(names[1:len(_PUBLISHED_SPECIAL)]))


def _assert_matches(ours, ref, texts, added_ids):
  for text in texts:
    ids = ref.encode(text, add_special_tokens=False)
    # Our encode() never emits specials: transformers' split_special_tokens=True.
    assert ours.encode(text).tolist() == ref.encode(
        text, add_special_tokens=False, split_special_tokens=True), text
    assert ours.encode_with_specials(text).tolist() == ids, text
    for skip in (True, False):
      assert ours.decode(ids, skip_special=skip) == ref.decode(
          ids, skip_special_tokens=skip), (text, skip)
  assert ours.is_special(np.array(added_ids)).tolist() == [
      i in set(ref.all_special_ids) for i in added_ids]


def test_qwen_added_tokens_match_transformers(qwen3, qwen_reference):
  added = list(range(151643, qwen3.vocab_size))
  _assert_matches(qwen3, qwen_reference, _TEXTS, added)
  # The reported cases, spelled out.
  assert qwen3.encode("<|fim_prefix|>").tolist() == [151659]
  assert qwen3.encode("<|im_start|>").tolist() != [151644]  # Specials stay text.
  assert qwen3.decode([151659, 151664, 151644, 151667]) == "<|fim_prefix|><|file_sep|><think>"
  assert not qwen3.is_special(151659) and qwen3.is_special(151645)


def test_qwen_fim_and_repo_markers_still_parse(qwen3, qwen_reference):
  """Infilling prompts name Qwen's FIM / repo tokens; the ids are transformers' ids."""
  assert (qwen3.fim_prefix_id, qwen3.fim_suffix_id, qwen3.fim_middle_id) == (
      151659, 151661, 151660)
  for text in _TEXTS[:2] + [layout.fim_prompt("a = ", "\nprint(a)")]:
    assert layout.parse(qwen3, text).ids.tolist() == qwen_reference.encode(
        text, add_special_tokens=False), text
  with pytest.raises(ValueError, match="unknown special token '<|fim_prefx|>'"):
    layout.parse(qwen3, "x<|fim_prefx|>y")


def test_eos_id_does_not_copy_the_vocabulary(qwen3):
  start = time.perf_counter()
  for _ in range(50):
    assert qwen3.eos_id == 151645
  # Each lookup copied the 150k-entry vocabulary (0.2 s); now it reads 26 added tokens.
  assert time.perf_counter() - start < 1.0


def _tiny_folder(folder):
  """A byte-level BPE tokenizer.json with special and non-special added tokens."""
  table = tokenizer_lib._bytes_to_unicode()  # pylint: disable=protected-access
  vocab = {table[b]: b for b in range(256)}
  merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  added = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
           ("<tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
           ("<|fim_suffix|>", False), ("<|file_sep|>", False)]
  tok.add_tokens([hf_tokenizers.AddedToken(c, special=s, normalized=False) for c, s in added])
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>"]}, f)
  return list(range(260, 268))


_TINY_TEXTS = ["hello<|fim_prefix|>x<tool_call>y<|im_start|>z<|file_sep|>",
               "<|fim_suffix|> hello<|fim_middle|><|im_end|><|endoftext|>"]


def test_from_folder_and_saved_folder_match_transformers(tmp_path):
  folder = str(tmp_path / "tiny")
  added = _tiny_folder(folder)
  ours = tokenizer_lib.PretrainedTokenizer.from_folder(folder)
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  _assert_matches(ours, ref, _TINY_TEXTS, added)
  assert ours.fim_prefix_id == 264 and ours.special_tokens["<|file_sep|>"] == 267
  # Saved and reloaded by transformers: the same specials.
  ours.save_pretrained(str(tmp_path / "saved"))
  saved = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "saved"))
  _assert_matches(ours, saved, _TINY_TEXTS, added)


def test_marker_of_a_non_special_added_token_parses(tmp_path):
  """A tokenizer that matches <|file_sep|> whole in text accepts it as a marker."""
  folder = str(tmp_path / "tiny")
  _tiny_folder(folder)
  tok = data_tokenizers.BPETokenizer.from_file(folder)
  text = "hello<|file_sep|>x"
  assert layout.parse(tok, text).ids.tolist() == tok.encode(text).tolist()
  assert layout.parse(tok, text).ids.tolist() == [259, 267, 120]
  with pytest.raises(ValueError, match="unknown special token '<|nope|>'"):
    layout.parse(tok, "<|nope|>")
