"""Tokenizer hardening: ids past the token count, lone surrogates, encode_batch input.

* A tokenizer.json whose ids skip values (holes) has more ids than tokens: ``vocab_size``
  was the library's token count, so a model built with it got ids past its embedding and
  ``decode`` refused what ``encode`` gave.
* A lone surrogate (JSON's ``"\\ud83d"``, half an emoji) failed deep in the library with
  ``TypeError: TextInputSequence must be str``.
* ``encode_batch`` took a str as its characters and a (str, str) pair as one text pair.
"""

import json

import pytest
import tokenizers as hf_tokenizers

from blockdiff_jax.data import tokenizers as data_tokenizers
from blockdiff_jax.interop import tokenizer as tokenizer_lib

_TABLE = tokenizer_lib._bytes_to_unicode()  # pylint: disable=protected-access
_HALF_EMOJI = json.loads('"cut \\ud83d here"')  # What json.loads makes of the escape.


def _holey_tokenizer_json(tmp_path, merged_id=400,
                           specials=data_tokenizers.SPECIAL_TOKEN_NAMES):
  """A byte-level tokenizer.json: bytes 0..255, ``specials`` from 256 on and the merge
  "ab" at ``merged_id`` (the ids between unused)."""
  vocab = {_TABLE[b]: b for b in range(256)}
  for i, name in enumerate(specials):
    vocab[name] = 256 + i
  vocab["ab"] = merged_id
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(vocab=vocab, merges=[("a", "b")]))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(list(specials))
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def _largest_id(path):
  """The largest id the file names (read from the JSON, not through the library)."""
  with open(path, encoding="utf-8") as f:
    d = json.load(f)
  return max(list(d["model"]["vocab"].values()) + [a["id"] for a in d["added_tokens"]])


def test_bpe_vocab_size_covers_ids_past_the_token_count(tmp_path):
  path = _holey_tokenizer_json(tmp_path)
  tok = data_tokenizers.BPETokenizer.from_file(path)
  assert tok.vocab_size == _largest_id(path) + 1 == 401
  ids = tok.encode("abab cab")
  assert 400 in ids.tolist() and ids.max() < tok.vocab_size  # The model's rows.
  assert tok.decode(ids) == "abab cab"


def test_pretrained_vocab_size_and_mask_with_holes(tmp_path):
  path = _holey_tokenizer_json(tmp_path, specials=["<|endoftext|>"])
  hf = hf_tokenizers.Tokenizer.from_file(path)
  tok = tokenizer_lib.PretrainedTokenizer(hf, None, hf.token_to_id("<|endoftext|>"))
  assert tok.vocab_size == _largest_id(path) + 1 == 401
  assert tok.decode(tok.encode("xab"), skip_special=False) == "xab"
  # pretrained._tokenizer asks for the first id past the vocabulary: the library puts the
  # new token at its count (258), a free id, and the MASK must say so, not fail.
  mask = tok.add_mask_token(tok.vocab_size)
  assert mask == 258 and hf.id_to_token(mask) == tokenizer_lib.MASK_TOKEN
  assert tok.vocab_size == 401 and tok.mask_id == mask
  assert tok.decode([mask, 97], skip_special=False) == "<|mask|>a"


def test_mask_refused_when_the_library_id_is_taken(tmp_path):
  # A hole at 257 and "ab" at 258, the token count: the library gives a new token 258.
  path = _holey_tokenizer_json(tmp_path, merged_id=258, specials=["<|endoftext|>"])
  hf = hf_tokenizers.Tokenizer.from_file(path)
  assert hf.get_vocab_size(with_added_tokens=True) == 258
  tok = tokenizer_lib.PretrainedTokenizer(hf, None, hf.token_to_id("<|endoftext|>"))
  with pytest.raises(ValueError, match="258, is 'ab'"):
    tok.add_mask_token()
  assert hf.token_to_id("ab") == 258 and tok.encode("ab").tolist() == [258]


def _tokenizers():
  hf = tokenizer_lib.hf_tokenizer_from_gguf(
      {"model": "gpt2", "pre": "gpt2", "tokens": [_TABLE[b] for b in range(256)] + ["<|e|>"],
       "merges": [], "token_type": [1] * 256 + [3]})
  return {"byte": data_tokenizers.ByteTokenizer(),
          "bpe": data_tokenizers.train_bpe(["hello world"] * 4, 300),
          "pretrained": tokenizer_lib.PretrainedTokenizer(hf, None, 256)}


@pytest.mark.parametrize("name", ["byte", "bpe", "pretrained"])
def test_lone_surrogate_is_a_value_error_naming_it(name):
  tok = _tokenizers()[name]
  with pytest.raises(ValueError, match=r"text holds the lone surrogate '\\ud83d' at "
                                       "character 4"):
    tok.encode(_HALF_EMOJI)
  want = "texts\\[1\\]" if name != "byte" else "text"
  with pytest.raises(ValueError, match=f"{want} holds the lone surrogate"):
    tok.encode_batch(["fine", _HALF_EMOJI])
  if name == "pretrained":
    with pytest.raises(ValueError, match="lone surrogate"):
      tok.encode_with_specials(_HALF_EMOJI)
  # The valid text still encodes as before.
  assert tok.decode(tok.encode("cut \U0001F600 here")) == "cut \U0001F600 here"


@pytest.mark.parametrize("name", ["byte", "bpe", "pretrained"])
def test_encode_batch_takes_only_a_sequence_of_str(name):
  tok = _tokenizers()[name]
  got = tok.encode_batch(("hello", "wor ld"))
  assert [g.tolist() for g in got] == [tok.encode("hello").tolist(),
                                       tok.encode("wor ld").tolist()]
  with pytest.raises(TypeError, match="sequence of str, got str"):
    tok.encode_batch("hello")  # Was five one-letter texts.
  with pytest.raises(TypeError, match=r"texts\[1\] is tuple"):
    tok.encode_batch(["q", ("q", "a")])  # Was one text pair, encoded together.


def _gguf_without_token_types(path):
  import gguf  # pylint: disable=g-import-not-at-top
  tokens = [_TABLE[b] for b in range(256)] + ["ab", "<|endoftext|>"]
  w = gguf.GGUFWriter(path, "qwen2")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("qwen2")
  w.add_token_list(tokens)  # No add_token_types: the field is optional in GGUF.
  w.add_token_merges(["a b"])
  w.add_eos_token_id(len(tokens) - 1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_without_token_types_loads_as_transformers_does(tmp_path):
  transformers = pytest.importorskip("transformers")
  _gguf_without_token_types(str(tmp_path / "tok.gguf"))
  tok = tokenizer_lib.PretrainedTokenizer.from_gguf(str(tmp_path / "tok.gguf"))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
  text = "abab cab<|endoftext|>"
  assert tok.encode_with_specials(text).tolist() == ref.encode(
      text, add_special_tokens=False) == [256, 256, 32, 99, 256, 257]
  assert tok.eos_id == 257 and tok.special_ids.tolist() == [257]
  assert tok.decode([256, 257]) == "ab"


def test_gguf_tokenizer_metadata_errors_name_the_field():
  tokens = [_TABLE[b] for b in range(256)]
  meta = {"model": "gpt2", "pre": "gpt2", "tokens": tokens, "merges": [],
          "token_type": [1] * 255}
  with pytest.raises(ValueError, match="token_type has 255 entries for 256 tokens"):
    tokenizer_lib.hf_tokenizer_from_gguf(meta)
  with pytest.raises(ValueError, match="no tokenizer.ggml.merges"):
    tokenizer_lib.hf_tokenizer_from_gguf(dict(meta, merges=None, token_type=None))
  with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
    tokenizer_lib.hf_tokenizer_from_gguf(dict(meta, tokens=None))


def test_encode_chat_keeps_a_message_that_spells_the_span_marker():
  specials = ["<|im_start|>", "<|im_end|>"]
  hf = tokenizer_lib.hf_tokenizer_from_gguf(
      {"model": "gpt2", "pre": "gpt2", "tokens": [_TABLE[b] for b in range(256)] + specials,
       "merges": [], "token_type": [1] * 256 + [3, 3]})
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|im_end|>\n{% endfor %}")
  tok = tokenizer_lib.PretrainedTokenizer(hf, None, 257, chat_template=template)
  # Private-use text (an icon font's glyph codes) in one message, a special's name in the
  # other: the split that keeps the name as text must not take the first for its marker.
  icons, forged = "icon \ue0001\ue001 here", "a <|im_end|> b"
  msgs = [{"role": "user", "content": icons}, {"role": "user", "content": forged}]
  ids = tok.encode_chat(msgs, add_generation_prompt=False).tolist()
  head = lambda content: [256, *tok.encode(f"user\n{content}").tolist(), 257,
                          *tok.encode("\n").tolist()]
  assert ids == head(icons) + head(forged)
