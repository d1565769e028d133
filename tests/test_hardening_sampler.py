"""Hostile prompts: malformed markers, invalid UTF-8 files, a bad prompt in a batch, infilling
from ``--mode=sample``."""

import glob
import json
import os

import numpy as np
import pytest
import tokenizers as hf_tokenizers

from conftest import small_model_config
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.model import build
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample

BLOCK, MAX_LEN, MAX_NEW = 8, 64, 8


@pytest.fixture(scope="module")
def tiny():
  c = small_model_config()
  c.diffusion.block_size = BLOCK
  c.data.seq_len = MAX_LEN
  model, tok = build.build_model(c)
  return c, model, tok, build.init_params(model, 0)


def _options(tok):
  return decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                               policy=policies.Threshold(0.05))


@pytest.mark.parametrize("marker", ["<|mask:-3|>", "<|EOS|>", "<|mask:0|>", "<|mask:x|>",
                                    "<|mask:|>", "<|bos:2|>", "<|nope|>"])
def test_unknown_or_malformed_markers_fail_naming_the_marker(tiny, marker):
  tok = tiny[2]
  with pytest.raises(ValueError, match=f"'{marker.replace('|', '[|]')}'"):
    layout.parse(tok, f"<|bos|>text {marker} more")


def test_known_markers_keep_working(tiny):
  tok = tiny[2]
  parsed = layout.parse(tok, "<|bos|>a<|mask:3|>b<|sep|>")
  want = np.concatenate([[tok.token_id("bos")], tok.encode("a"), [tok.mask_id] * 3,
                         tok.encode("b"), [tok.token_id("sep")]])
  np.testing.assert_array_equal(parsed.ids, want)
  assert parsed.maskable.sum() == 3
  # Text that only looks like a marker with spaces stays text.
  np.testing.assert_array_equal(layout.parse(tok, "a <| b |> c").ids, tok.encode("a <| b |> c"))


def test_a_pretrained_tokenizers_own_special_tokens_are_markers():
  vocab = {"[UNK]": 0, "hi": 1, "there": 2, "<|endoftext|>": 3, "<|im_start|>": 4}
  hf = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = hf_tokenizers.pre_tokenizers.Whitespace()
  hf.add_special_tokens([hf_tokenizers.AddedToken("<|endoftext|>", special=True),
                         hf_tokenizers.AddedToken("<|im_start|>", special=True)])
  tok = tokenizer_lib.PretrainedTokenizer(hf, bos_id=None, eos_id=3)
  tok.add_mask_token()
  parsed = layout.parse(tok, "<|im_start|>hi there<|eos|><|mask:2|>")
  np.testing.assert_array_equal(parsed.ids, [4, 1, 2, 3, tok.mask_id, tok.mask_id])
  with pytest.raises(ValueError, match="'<[|]im_end[|]>'"):
    layout.parse(tok, "<|im_start|>hi<|im_end|>")


def test_a_prompts_file_with_invalid_utf8_names_the_file_and_offset(tmp_path):
  path = tmp_path / "prompts.txt"
  raw = b"<|bos|>fine\n<|bos|>caf\xe9 au lait\n"
  path.write_bytes(raw)
  s = sample.default_sample_config()
  s.prompts_file = str(path)
  offset = raw.index(b"\xe9")  # 22
  with pytest.raises(ValueError, match=f"{path} is not UTF-8: byte offset {offset} [(]line 2"):
    sample.read_prompts(s)


def test_one_bad_prompt_is_reported_and_the_others_answered(tiny):
  _, model, tok, params = tiny
  good, span = "<|bos|>hello there", "<|bos|>x = <|mask:3|>;"
  prompts = ["<|bos|>a <|mask:-3|>", good, "", span, "<|bos|>" + "y" * 70]
  rows, summary = sample.answer(model, params, tok, prompts, _options(tok), MAX_NEW, MAX_LEN)
  assert [r["prompt"] for r in rows] == prompts
  assert "'<|mask:-3|>'" in rows[0]["error"]
  assert "empty" in rows[2]["error"]
  assert "exceeds the context" in rows[4]["error"]
  # The good prompts get what they get on their own.
  alone, _ = sample.generate(model, params, tok, [good], _options(tok), MAX_NEW, MAX_LEN)
  assert rows[1]["tokens"] == alone[0]["tokens"] and "error" not in rows[1]
  filled = sample.infill(model, params, tok, [span], _options(tok), MAX_LEN)[0]
  assert rows[3]["completion"] == filled["text"] and rows[3]["spans"] == filled["spans"]
  assert summary["generated_tokens"] == rows[1]["generated_tokens"]


def test_mode_sample_infills_and_records_errors_in_the_results_json(tiny, tmp_path,
                                                                    monkeypatch):
  config, model, tok, params = tiny
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda workdir, cfg: (config, model, tok, params))
  config = config.copy_and_resolve_references()
  config.sample = sample.default_sample_config()
  config.sample.prompts = "<|bos|>def f(x):<|mask:4|>;<|bos|>hi<|EOS|>;<|bos|>hello"
  config.sample.max_new_tokens = MAX_NEW
  config.sample.stream = False
  rows = sample.run(config, str(tmp_path))
  saved = json.load(open(glob.glob(os.path.join(tmp_path, "samples", "*.json"))[0]))
  assert saved["samples"] == json.loads(json.dumps(rows))
  assert len(rows[0]["spans"]) == 1 and rows[0]["completion"].startswith("<|bos|>def f(x):")
  assert "'<|EOS|>'" in rows[1]["error"]
  assert rows[2]["generated_tokens"] >= 1 and "error" not in rows[2]


def test_mode_sample_refuses_a_bad_sample_field_before_decoding(tiny, tmp_path, monkeypatch):
  config, model, tok, params = tiny
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda workdir, cfg: (cfg, model, tok, params))
  monkeypatch.setattr(sample, "answer", lambda *a, **k: pytest.fail("decoded anyway"))
  config = config.copy_and_resolve_references()
  config.sample = sample.default_sample_config()
  config.sample.max_new_tokens = 0
  with pytest.raises(ValueError, match="sample.max_new_tokens"):
    sample.run(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "samples"))


@pytest.mark.parametrize("sampling", [policies.Sampling(top_k=1), policies.Sampling(top_k=5),
                                      policies.Sampling(top_p=0.01)],
                         ids=["top_k=1", "top_k=5", "top_p=0.01"])
def test_greedy_decoding_ignores_top_k_and_top_p(tiny, sampling):
  """Filtering cannot change an argmax, but a threshold policy ranks by confidence: under
  a renormalised top_k=1 softmax every position is 1.0 and whole blocks fill at once."""
  _, model, tok, params = tiny
  canvas = layout.generation_canvas([layout.parse(tok, "<|bos|>hello world").ids], 16,
                                    BLOCK, tok.mask_id, MAX_LEN)
  outs = []
  for s in (policies.Sampling(), sampling):
    opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                                policy=policies.Threshold(0.9), sampling=s)
    outs.append(decoder.decode(model, params, canvas, opt))
  np.testing.assert_array_equal(outs[1]["tokens"], outs[0]["tokens"])
  np.testing.assert_array_equal(outs[1]["nfe"], outs[0]["nfe"])
  assert int(outs[0]["nfe"][0]) > 2  # An untrained model is never 0.9 sure: no trivial pass.


def test_an_explicit_span_length_of_zero_is_refused_not_made_one():
  text = "def f(x):\n    return x\n"
  a, b = text.index("return"), text.index("x\n", 12) + 1  # "return x"
  got = layout.spans_to_markers(None, text, [(a, b)], lengths=[3])
  assert got == "def f(x):\n    <|mask:3|>\n"
  with pytest.raises(ValueError, match="span 0 .* length 0"):
    layout.spans_to_markers(None, text, [(a, b)], lengths=[0])
