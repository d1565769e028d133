"""Fixes of earlier stops' "noticed and left alone": unknown Qwen model types, JSONL line
order under max_bytes, YaRN temperatures <= 0, and MASK ids checked by every objective."""

import json
import math

import pytest

from blockdiff_jax.data import corpora
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.model import rope


@pytest.mark.parametrize("model_type", ["qwen3.5", "qwen35", "Qwen2", "llama", ""])
def test_qwen_tokenizer_refuses_unknown_model_types(model_type):
  # "qwen3.5" used to get Qwen3's 26 specials, "qwen2x" Qwen2's: a vocabulary that is not
  # the model's, with no word.
  with pytest.raises(ValueError, match="model_type"):
    tokenizer_lib.qwen_tokenizer(model_type)


@pytest.mark.parametrize("model_type,count", [("qwen2_moe", 22), ("qwen3_moe", 26)])
def test_qwen_tokenizer_moe_types_take_their_family(model_type, count):
  tok = tokenizer_lib.qwen_tokenizer(model_type)
  assert tok.vocab_size == tokenizer_lib.QWEN_FIRST_SPECIAL + count


def test_jsonl_lines_keep_their_order_under_max_bytes(tmp_path):
  path = tmp_path / "docs.jsonl"
  lines = [f"line number {i:02d}" for i in range(1, 13)]
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
  docs = corpora.file_documents(str(path), "train", validation_fraction=0.0)
  assert [d.text for d in docs] == lines  # Line 10 used to come before line 2.
  # max_bytes takes a prefix of the file, not of its keys sorted as text.
  first = corpora.file_documents(str(path), "train", validation_fraction=0.0,
                                 max_bytes=3 * len(lines[0]))
  assert [d.text for d in first] == lines[:3]


def test_jsonl_files_stay_in_key_order(tmp_path):
  for name, texts in (("b.jsonl", ["b1", "b2"]), ("a.jsonl", ["a1"]), ("c.txt", ["c"])):
    (tmp_path / name).write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts) if name.endswith("l")
        else texts[0], encoding="utf-8")
  docs = corpora.file_documents(str(tmp_path), "train", validation_fraction=0.0)
  assert [d.text for d in docs] == ["a1", "b1", "b2", "c"]


@pytest.mark.parametrize("name", ["mscale", "mscale_all_dim"])
@pytest.mark.parametrize("scale", [-10.0, -20.0])
def test_yarn_refuses_temperatures_at_or_below_zero(name, scale):
  # mscale_all_dim = -10 / ln(factor) made the denominator 0 (ZeroDivisionError at the
  # first forward); below it the attention logits flipped sign.
  fields = {"mscale": 1.0, "mscale_all_dim": 1.0, name: scale / math.log(4.0)}
  with pytest.raises(ValueError, match=name):
    rope.RopeScaling(type="yarn", factor=4.0, **fields)


def test_yarn_ignores_the_temperatures_under_an_explicit_attention_factor():
  # As yarn_attention_factor and transformers do: the factor replaces the two fields.
  scaling = rope.RopeScaling(type="yarn", factor=4.0, attention_factor=1.0, mscale=-10.0,
                             mscale_all_dim=1.0)
  assert rope.yarn_attention_factor(scaling) == 1.0


def test_yarn_keeps_deepseek_temperatures():
  scaling = rope.RopeScaling(type="yarn", factor=40.0, mscale=0.707, mscale_all_dim=0.707)
  assert rope.yarn_attention_factor(scaling) == pytest.approx(1.0)
  scaling = rope.RopeScaling(type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.5)
  expect = (0.1 * math.log(40.0) + 1) / (0.05 * math.log(40.0) + 1)
  assert rope.yarn_attention_factor(scaling) == pytest.approx(expect)


OBJECTIVES = [
    lambda m: losses.BlockDiffusionObjective(block_size=4, mask_id=m),
    lambda m: fastdllm.FastDLLMObjective(block_size=4, mask_id=m),
    lambda m: autoregressive.AutoregressiveObjective(mask_id=m),
    lambda m: introspective.IntrospectiveObjective(stride=2, mask_id=m),
]


@pytest.mark.parametrize("make", OBJECTIVES)
@pytest.mark.parametrize("mask_id", [-1, 2.0, None, True, "5"])
def test_objectives_refuse_bad_mask_ids(make, mask_id):
  with pytest.raises(ValueError, match="mask_id"):
    make(mask_id)


@pytest.mark.parametrize("make", OBJECTIVES)
def test_objectives_take_integer_mask_ids(make):
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert make(0).mask_id == 0
  assert make(np.int64(7)).mask_id == 7
