"""Imports match their references: GGUF YaRN RoPE scaling (llama.cpp's keys, checked
against transformers and ggml's ``rope_yarn``) and the ``pad_token`` chat templates see."""

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import test_interop_pretrained as tiny
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.model import rope
from conftest import randomized_hf_model

_ADD = {str: "add_string", float: "add_float32", int: "add_uint32", bool: "add_bool"}


def _add_keys(writer, keys):
  for key, value in keys.items():
    getattr(writer, _ADD[type(value)])(key, value)


def _metadata_gguf(path, arch, head_dim, theta, context, keys):
  """A GGUF holding only the metadata hf_config_from_metadata reads (4 heads)."""
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(1)
  w.add_context_length(context)
  w.add_embedding_length(4 * head_dim)
  w.add_feed_forward_length(8)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_key_length(head_dim)
  w.add_rope_freq_base(theta)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_vocab_size(16)
  _add_keys(w, {f"{arch}.{k}": v for k, v in keys.items()})
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  reader = gguf_io._reader(path)  # pylint: disable=protected-access
  return gguf_io.hf_config_from_metadata(reader, path, False)


def _ours(config):
  o = architectures.model_overrides(config)
  scaling = rope.RopeScaling(**{k.split(".", 1)[1]: v for k, v in o.items()
                                if k.startswith("rope_scaling.")})
  inv, attn = rope.inverse_frequencies(o["head_dim"], o["rope_theta"], scaling)
  return np.asarray(inv, np.float64), attn


def _ggml_yarn(head_dim, theta, factor, original):
  """(effective inverse frequencies, cos/sin scale) of ggml's rope_yarn as llama.cpp runs it.

  ggml-cpu: corr dims floor/ceil of d ln(n_ctx_orig / (2 pi beta)) / (2 ln base) for beta
  32 and 1, clamped to [0, d - 1]; ramp_mix = 1 - clamp((i - low) / max(0.001, high -
  low)); theta = interp (1 - ramp_mix) + extrap ramp_mix, and mscale = attn_factor (1 +
  0.1 ln(1 / freq_scale)), where llama-context.cpp's attn_factor = get_mscale(s) / (1 + 0.1
  ln s) = 1 (older llama.cpp: 1 too).
  """
  corr = lambda beta: head_dim * math.log(original / (2 * math.pi * beta)) / (2 * math.log(theta))
  low, high = max(0, math.floor(corr(32))), min(head_dim - 1, math.ceil(corr(1)))
  i = np.arange(head_dim // 2, dtype=np.float64)
  extrap = theta ** (-2 * i / head_dim)
  mix = 1 - np.clip((i - low) / max(0.001, high - low), 0, 1)
  return extrap / factor * (1 - mix) + extrap * mix, 1.0 * (1 + 0.1 * math.log(factor))


# (arch, head_dim, theta, factor, original or None (the key left out), context length).
@pytest.mark.parametrize("arch,head_dim,theta,factor,original,context", [
    ("qwen2", 128, 1e6, 4.0, 32768, 32768),  # Qwen2.5-7B-Instruct's documented YaRN.
    ("qwen3", 128, 1e6, 4.0, 32768, 40960),  # Qwen3-8B's.
    ("llama", 16, 1e5, 4.0, 32, 256),
    ("qwen3moe", 64, 1e4, 8.0, None, 4096),  # llama.cpp: the context length, as HF.
])
def test_gguf_yarn_matches_transformers_and_ggml(tmp_path, arch, head_dim, theta, factor,
                                                 original, context):
  keys = {"rope.scaling.type": "yarn", "rope.scaling.factor": factor}
  if original is not None:
    keys["rope.scaling.original_context_length"] = original
  if arch == "qwen3moe":
    keys.update({"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 8})
  config = _metadata_gguf(str(tmp_path / "m.gguf"), arch, head_dim, theta, context, keys)
  inv, attn = _ours(config)
  params = {"rope_type": "yarn", "factor": factor, "rope_theta": theta}
  if original is not None:
    params["original_max_position_embeddings"] = original
  ref_config = transformers.Qwen2Config(
      hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
      head_dim=head_dim, max_position_embeddings=context, rope_parameters=params)
  want, want_attn = ROPE_INIT_FUNCTIONS["yarn"](ref_config, "cpu")
  np.testing.assert_allclose(inv, want.double().numpy(), rtol=1e-6)
  assert attn == pytest.approx(want_attn, rel=1e-6)
  ggml_inv, ggml_attn = _ggml_yarn(head_dim, theta, factor, original or context)
  np.testing.assert_allclose(inv, ggml_inv, rtol=1e-6)
  assert attn == pytest.approx(ggml_attn, rel=1e-6)
  assert not np.allclose(inv, theta ** (-np.arange(0, head_dim, 2) / head_dim))  # Scaled.


def test_gguf_yarn_logits_match_transformers_beyond_the_original_context(tmp_path, monkeypatch):
  bpe = tiny._bpe()  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = randomized_hf_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
                       "original_max_position_embeddings": 16},
      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)))

  class Writer(gguf.GGUFWriter):  # Adds the keys llama.cpp's converter writes for YaRN.

    def write_header_to_file(self, *args, **kwargs):
      _add_keys(self, {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                       "llama.rope.scaling.original_context_length": 16,
                       "llama.rope.scaling.finetuned": True})
      return super().write_header_to_file(*args, **kwargs)

  path = str(tmp_path / "yarn.gguf")
  with monkeypatch.context() as m:
    m.setattr(tiny.gguf, "GGUFWriter", Writer)
    reference = tiny.write_tiny_gguf(path, model, bpe)
  pre = pretrained.load(path, str(tmp_path / "work"), add_mask=False)
  cfg = hf.transformer_config(pre.model_overrides)
  tokens = np.random.RandomState(0).randint(0, bpe.vocab_size, (1, 48))  # 3x the original.
  with torch.no_grad():
    want = reference(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(causal_lm.logits(cfg, pre.params, tokens), want, atol=1e-4, rtol=0)
  unscaled = hf.transformer_config({**pre.model_overrides, "rope_scaling.type": "none"})
  assert np.abs(causal_lm.logits(unscaled, pre.params, tokens) - want).max() > 1e-2


_YARN = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
         "rope.scaling.original_context_length": 32}
_MAPPED = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


# llama.cpp reads yarn_ext_factor/attn_factor/beta_fast/beta_slow only for some
# architectures (grok, gpt-oss ...) and yarn_log_multiplier for DeepSeek-style ones; for
# llama and Qwen it computes with 1, 1 + 0.1 ln s, 32, 1 and 0 whatever they say, while
# transformers applies the HF fields they were converted from.
@pytest.mark.parametrize("keys,want", [
    ({"rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
      "rope.scaling.yarn_attn_factor": 1 + 0.1 * math.log(4.0), "rope.scaling.finetuned": True},
     _MAPPED),
    ({"rope.scaling.yarn_beta_fast": 16.0}, r"qwen2\.rope\.scaling\.yarn_beta_fast=16\.0 "),
    ({"rope.scaling.yarn_beta_slow": 2.0}, r"qwen2\.rope\.scaling\.yarn_beta_slow=2\.0 "),
    ({"rope.scaling.yarn_attn_factor": 1.5}, r"qwen2\.rope\.scaling\.yarn_attn_factor=1\.5 "),
    ({"rope.scaling.yarn_ext_factor": 0.5}, r"qwen2\.rope\.scaling\.yarn_ext_factor=0\.5 "),
    ({"rope.scaling.yarn_log_multiplier": 0.1}, r"qwen2\.rope\.scaling\.yarn_log_multiplier"),
    ({"rope.scaling.attn_factor": 2.0}, r"qwen2\.rope\.scaling\.attn_factor=2\.0"),
    ({"rope.scaling.factor": 1.0}, None),  # No interpolation and a temperature of 1.
    ({"rope.scaling.type": "longrope"}, r"qwen2\.rope\.scaling\.type='longrope'"),
])
def test_gguf_yarn_keys(tmp_path, keys, want):
  path = str(tmp_path / "m.gguf")
  if isinstance(want, str):
    with pytest.raises(architectures.UnsupportedArchitectureError, match=want):
      _metadata_gguf(path, "qwen2", 16, 1e4, 256, {**_YARN, **keys})
    return
  assert _metadata_gguf(path, "qwen2", 16, 1e4, 256, {**_YARN, **keys}).get("rope_scaling") == want


# --- what chat templates see -------------------------------------------------------------------

_PAD_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                 "[{% if pad_token is defined %}pad={{ pad_token }}{% else %}no pad{% endif %}]")


@pytest.mark.parametrize("pad", [None, "<|pad|>"])
def test_chat_template_pad_token_is_the_tokenizers_own(tmp_path, pad):
  bpe = tiny._bpe()  # pylint: disable=protected-access
  folder = str(tmp_path)
  bpe.hf_tokenizer.save(os.path.join(folder, "tokenizer.json"))
  tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
          "eos_token": "<|eos|>", "chat_template": _PAD_TEMPLATE}
  if pad is not None:
    tcfg["pad_token"] = pad
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tcfg, f)
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  ours = tokenizer_lib.PretrainedTokenizer.from_folder(folder)
  messages = [{"role": "user", "content": "hi"}]
  want = ref.apply_chat_template(messages, tokenize=False)
  assert want == ("hi[no pad]" if pad is None else f"hi[pad={pad}]")
  assert ours.apply_chat_template(messages) == want
  # The data pipeline still pads with eos when the model has no pad.
  assert ours.pad_id == (ours.eos_id if pad is None else bpe.hf_tokenizer.token_to_id(pad))
