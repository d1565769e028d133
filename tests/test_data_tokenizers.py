"""Tests of blockdiff_jax.data.tokenizers."""

import json
import os
import re

import numpy as np
import pytest
import tokenizers as hf_tokenizers

from blockdiff_jax.data import config as config_lib
from blockdiff_jax.data import tokenizers

TEXTS = [
    "",
    "hello world",
    "héllo wörld",
    "日本語のテキスト 🎉 emoji",
    "tabs\tand\nnewlines\r\n  spaces  ",
    "def f(x):\n    return x + 1\n",
    "\x00 control \x7f chars",
]

# A few KB of varied text for BPE training.
_CORPUS = [
    f"def function_{i}(arg):\n    return arg * {i} + {i * i}  # comment é\n"
    for i in range(200)
] + ["The quick brown fox jumps over the lazy dog. 日本語. " * 5] * 4


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  return tokenizers.train_bpe(_CORPUS, vocab_size=400, path=path), path


def _all(bpe_fixture):
  return [tokenizers.ByteTokenizer(), bpe_fixture[0]]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
  assert tok.decode(ids) == text


def test_byte_layout():
  tok = tokenizers.ByteTokenizer()
  assert tok.vocab_size == 264
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (256, 257, 258,
                                                                259)
  assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id,
          tok.sep_id) == (260, 261, 262, 263)


def test_byte_decode_specials_and_invalid_utf8():
  tok = tokenizers.ByteTokenizer()
  ids = [tok.bos_id, *"é".encode(), tok.eos_id, 0xFF]
  assert tok.decode(ids) == "é\ufffd"
  assert tok.decode(ids, skip_special=False) == "<|bos|>é<|eos|>\ufffd"
  with pytest.raises(ValueError, match="264"):
    tok.decode([264])


@pytest.mark.parametrize("which", [0, 1])
def test_specials_distinct_and_in_range(bpe, which):
  tok = _all(bpe)[which]
  ids = [tok.special_tokens[n] for n in tokenizers.SPECIAL_TOKEN_NAMES]
  assert len(set(ids)) == len(ids)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.is_special(tok.mask_id) is True
  np.testing.assert_array_equal(tok.is_special(np.array(ids)), True)


@pytest.mark.parametrize("which", [0, 1])
def test_token_id_names(bpe, which):
  tok = _all(bpe)[which]
  assert tok.token_id("<|sep|>") == tok.token_id("sep") == tok.sep_id
  with pytest.raises(KeyError, match=re.escape("<|nope|>")):
    tok.token_id("<|nope|>")


@pytest.mark.parametrize("which", [0, 1])
def test_encode_never_emits_specials(bpe, which):
  tok = _all(bpe)[which]
  text = "a <|eos|> b <|mask|>"
  ids = tok.encode(text)
  assert not tok.is_special(ids).any()
  assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip_and_reload(bpe, text):
  tok, path = bpe
  assert os.path.isfile(path)
  reloaded = tokenizers.BPETokenizer.from_file(path)
  ids = tok.encode(text)
  np.testing.assert_array_equal(reloaded.encode(text), ids)
  assert reloaded.decode(ids) == text
  assert reloaded.special_tokens == tok.special_tokens


def test_bpe_compresses(bpe):
  tok, _ = bpe
  assert tok.vocab_size == 400
  text = _CORPUS[3]
  assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2
  with_specials = [tok.bos_id, *tok.encode("hi"), tok.eos_id]
  assert tok.decode(with_specials) == "hi"
  assert tok.decode(with_specials, skip_special=False) == "<|bos|>hi<|eos|>"


def test_bpe_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tokenizers.BPETokenizer.from_file(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    tokenizers.BPETokenizer.from_file(str(bad))
  with pytest.raises(ValueError, match="100"):
    tokenizers.train_bpe(_CORPUS, vocab_size=100)


def test_bpe_file_without_specials_gets_them_added(tmp_path):
  hf = hf_tokenizers
  raw = hf.Tokenizer(hf.models.BPE())
  raw.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = hf.decoders.ByteLevel()
  raw.train_from_iterator(_CORPUS, hf.trainers.BpeTrainer(
      vocab_size=300, show_progress=False,
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  path = str(tmp_path / "tokenizer.json")
  raw.save(path)
  tok = tokenizers.BPETokenizer.from_file(str(tmp_path))  # Folder works too.
  ids = sorted(tok.special_tokens[n] for n in tokenizers.SPECIAL_TOKEN_NAMES)
  assert ids == list(range(300, 308))
  assert tok.vocab_size == 308
  assert tok.decode(tok.encode("héllo")) == "héllo"


def test_get_tokenizer(tmp_path):
  cfg = config_lib.default_data_config()
  assert isinstance(tokenizers.get_tokenizer(cfg), tokenizers.ByteTokenizer)

  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(40):
    (docs / f"f{i}.txt").write_text(_CORPUS[i] * 3)
  cfg.corpus, cfg.paths = "files", str(docs)
  cfg.tokenizer, cfg.bpe_vocab_size = "bpe", 300
  workdir = tmp_path / "work"
  tok = tokenizers.get_tokenizer(cfg, str(workdir))
  saved = workdir / tokenizers.TOKENIZER_FILENAME
  assert saved.is_file() and tok.vocab_size == 300
  # A second call reuses the saved file; a changed request is refused, not served stale.
  assert tokenizers.get_tokenizer(cfg, str(workdir)).vocab_size == 300
  cfg.bpe_vocab_size = 350
  with pytest.raises(ValueError, match=r"data\.bpe_vocab_size=300 \(config: 350\)"):
    tokenizers.get_tokenizer(cfg, str(workdir))
  cfg.bpe_vocab_size = 300
  assert json.loads(saved.read_text())["model"]["type"] == "BPE"

  cfg.tokenizer = str(saved)
  assert tokenizers.get_tokenizer(cfg).vocab_size == 300
  cfg.tokenizer = str(tmp_path / "nothing_here.json")
  with pytest.raises(ValueError, match="nothing_here"):
    tokenizers.get_tokenizer(cfg)
