"""Llama-3.1+ ("llama3") RoPE scaling through HF and GGUF import and HF export, the GGUF
conversion cache with same-named files, and import edge cases (MQA, head_dim, bf16, a
malformed tokenizer_config.json)."""

import math
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_numpy
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import test_interop_pretrained as tiny
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.model import rope
from conftest import randomized_hf_model

VOCAB = 97
_EMBED = "model.embed_tokens.weight"


def _llama3(factor=8.0, original=32, low=1.0, high=4.0, theta=10000.0):
  return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
          "high_freq_factor": high, "original_max_position_embeddings": original}


def _hf_llama(rope_parameters=None, seed=0, vocab=VOCAB, **kwargs):
  """A tiny random LlamaForCausalLM (norms random too)."""
  torch.manual_seed(seed)
  fields = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
  fields.update(kwargs)
  if rope_parameters is not None:
    fields["rope_parameters"] = rope_parameters
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
  return randomized_hf_model(model)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _tokens(length=96, vocab=VOCAB):
  return np.random.RandomState(1).randint(0, vocab, (2, length)).astype(np.int64)


def _import(folder, **kwargs):
  overrides = hf.read_overrides(folder)
  cfg = hf.transformer_config(overrides, **kwargs)
  return overrides, cfg, hf.load_params(folder, cfg)


# --- inverse frequencies ----------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,theta,factor,original,low,high", [
    (128, 500000.0, 8.0, 8192, 1.0, 4.0),  # Llama 3.1 8B/70B/405B.
    (64, 500000.0, 32.0, 8192, 1.0, 4.0),  # Llama 3.2 1B.
    (128, 500000.0, 32.0, 8192, 1.0, 4.0),  # Llama 3.2 3B.
    (64, 10000.0, 4.0, 2048, 2.0, 16.0),
    (16, 10000.0, 2.5, 100, 0.5, 3.0),
])
def test_inverse_frequencies_match_transformers(head_dim, theta, factor, original, low, high):
  params = _llama3(factor, original, low, high, theta)
  config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                    head_dim=head_dim, max_position_embeddings=16 * original,
                                    rope_parameters=params)
  want, want_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
  want = want.double().numpy()
  got, got_factor = rope.inverse_frequencies(
      head_dim, theta, rope.RopeScaling("llama3", factor, original, low_freq_factor=low,
                                        high_freq_factor=high))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0)
  assert got_factor == want_factor == 1.0
  # Every regime occurs: kept, divided by the factor, and on the ramp in between.
  ratio = want * theta ** (np.arange(0, head_dim, 2) / head_dim)
  assert np.any(np.isclose(ratio, 1.0, rtol=1e-5))
  assert np.any(np.isclose(ratio, 1.0 / factor, rtol=1e-5))
  assert np.any((ratio > 1.0 / factor * (1 + 1e-4)) & (ratio < 1.0 - 1e-4))


def test_bad_llama3_fields_are_named():
  with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
    rope.RopeScaling("llama3", 8.0, 8192, low_freq_factor=4.0, high_freq_factor=4.0)
  with pytest.raises(architectures.UnsupportedArchitectureError, match="high_freq_factor"):
    architectures.model_overrides({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 8,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}})


# --- Hugging Face import and export -----------------------------------------------------------


def test_hf_llama3_logits_match_transformers_beyond_the_original_length(tmp_path):
  model = _hf_llama(_llama3(original=32))
  model.save_pretrained(str(tmp_path))
  overrides, cfg, params = _import(str(tmp_path))
  assert cfg.rope_scaling == rope.RopeScaling("llama3", 8.0, 32, low_freq_factor=1.0,
                                              high_freq_factor=4.0)
  tokens = _tokens(96)  # Three times the original context.
  ref = _torch_logits(model, tokens)
  np.testing.assert_allclose(causal_lm.logits(cfg, params, tokens), ref, atol=1e-4, rtol=0)
  # The scaling matters: plain RoPE computes another model.
  plain = hf.transformer_config({**overrides, "rope_scaling.type": "none"})
  assert np.abs(causal_lm.logits(plain, params, tokens) - ref).max() > 0.1


def test_llama3_fields_survive_the_training_config_path():
  # init.pretrained writes the import's overrides into config.model; the model built
  # from it must keep non-default ramp bounds, not fall back to 1 and 4.
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import transformer  # pylint: disable=g-import-not-at-top
  overrides = {"rope_scaling.type": "llama3", "rope_scaling.factor": 8.0,
               "rope_scaling.original_max_position": 64,
               "rope_scaling.low_freq_factor": 2.0, "rope_scaling.high_freq_factor": 16.0}
  c = config_lib.base_config()
  pretrained.apply_overrides(c.model, overrides)
  config_lib.validate(c)
  want = rope.RopeScaling("llama3", 8.0, 64, low_freq_factor=2.0, high_freq_factor=16.0)
  assert transformer.TransformerConfig.from_config(c.model, 97).rope_scaling == want


def test_hub_style_rope_scaling_config_gives_the_same_overrides(tmp_path):
  """Llama-3.1 hub files (before transformers 5): rope_theta plus a rope_scaling dict."""
  model = _hf_llama(_llama3(original=32, theta=5e5))
  model.save_pretrained(str(tmp_path))
  want = hf.read_overrides(str(tmp_path))
  config = hf.read_hf_config(str(tmp_path))
  params = config.pop("rope_parameters")
  config["rope_theta"] = params.pop("rope_theta")
  config["rope_scaling"] = params
  assert architectures.model_overrides(config) == want
  assert want["rope_theta"] == 5e5 and want["rope_scaling.type"] == "llama3"
  # transformers falls back to max_position_embeddings for a missing original length.
  del config["rope_scaling"]["original_max_position_embeddings"]
  assert architectures.model_overrides(config)["rope_scaling.original_max_position"] == 256


def test_llama3_export_loads_in_transformers(tmp_path):
  model = _hf_llama(_llama3(original=32))
  src, out = str(tmp_path / "src"), str(tmp_path / "out")
  model.save_pretrained(src)
  overrides, cfg, params = _import(src)
  hf.export(out, params, cfg, overrides)
  config = hf.read_hf_config(out)
  assert config["rope_parameters"] == _llama3(original=32)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = _tokens(80)
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens),
                             atol=1e-5, rtol=0)
  # A model built here (no overrides) exports its llama3 scaling too.
  hf.export(str(tmp_path / "fresh"), params, cfg)
  assert hf.read_overrides(str(tmp_path / "fresh")) == {
      **hf.read_overrides(out), "_max_position_embeddings": 8192}


# --- GGUF ------------------------------------------------------------------------------------


def _llama_cpp_rope_factors(config) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf.py LlamaModel rope_freqs.weight, loop for loop."""
  p = config.rope_parameters
  dim = config.head_dim
  freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
  factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
  old_context_len = p["original_max_position_embeddings"]
  low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
  factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      factors.append(1)
    elif wavelen > low_freq_wavelen:
      factors.append(factor)
    else:
      smooth = (old_context_len / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(factors, np.float32)


def _gguf_with_rope_factors(monkeypatch, path, model, bpe, factors):
  class Writer(tiny.gguf.GGUFWriter):

    def write_header_to_file(self, *args, **kwargs):
      self.add_tensor("rope_freqs.weight", factors)
      return super().write_header_to_file(*args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(tiny.gguf, "GGUFWriter", Writer)
    return tiny.write_tiny_gguf(path, model, bpe)


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path, monkeypatch):
  bpe = tiny._bpe()  # pylint: disable=protected-access
  # head_dim 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, 199, ...; two on the ramp [16, 64].
  # (The tiny GGUF has no key_length: head_dim is hidden_size / heads.)
  model = _hf_llama(_llama3(original=64), vocab=bpe.vocab_size, tie_word_embeddings=True,
                    hidden_size=64)
  factors = _llama_cpp_rope_factors(model.config)
  assert 1.0 < factors[1] < factors[2] < 8.0 == factors[3]
  path = str(tmp_path / "llama3.gguf")
  reference = _gguf_with_rope_factors(monkeypatch, path, model, bpe, factors)
  pre = pretrained.load(path, str(tmp_path / "work"), add_mask=False)
  assert {k: v for k, v in pre.model_overrides.items() if k.startswith("rope_scaling.")} == {
      "rope_scaling.type": "llama3", "rope_scaling.factor": 8.0,
      "rope_scaling.original_max_position": 64, "rope_scaling.low_freq_factor": 1.0,
      "rope_scaling.high_freq_factor": 4.0}
  cfg = hf.transformer_config(pre.model_overrides)
  tokens = _tokens(160, bpe.vocab_size)  # 2.5 times the original context.
  ref = _torch_logits(reference, tokens)
  # float32 angles of positions ~150 differ by ~1e-5 rad between the two implementations.
  np.testing.assert_allclose(causal_lm.logits(cfg, pre.params, tokens), ref, atol=3e-4, rtol=0)
  plain = hf.transformer_config({**pre.model_overrides, "rope_scaling.type": "none"})
  assert np.abs(causal_lm.logits(plain, pre.params, tokens) - ref).max() > 0.1


@pytest.mark.parametrize("head_dim,factor,original,low,high,want_original,want_high", [
    (128, 8.0, 8192, 1.0, 4.0, 8192, 4.0),  # Llama 3.1: recovered as written.
    (64, 32.0, 8192, 1.0, 4.0, 8192, 4.0),  # Llama 3.2 1B.
    (64, 4.0, 2048, 2.0, 16.0, 1024, 8.0),  # Same wavelengths, low_freq_factor 1.
])
def test_llama3_parameters_from_llama_cpp_factors(head_dim, factor, original, low, high,
                                                  want_original, want_high):
  config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                    head_dim=head_dim,
                                    rope_parameters=_llama3(factor, original, low, high, 5e5))
  got = gguf_io.llama3_rope_scaling(_llama_cpp_rope_factors(config).astype(np.float64),
                                    head_dim, 5e5)
  assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                 "high_freq_factor": want_high,
                 "original_max_position_embeddings": want_original}


@pytest.mark.parametrize("factors,match", [
    ([1.0, 2.0, 1.5, 3.0, 8.0, 8.0, 8.0, 8.0], "not llama3"),  # Not monotonic.
    ([1.0, 1.0, 4.0, 2.0, 8.0, 8.0, 8.0, 8.0], "not llama3"),  # Ramp the wrong way.
    ([1.0] * 4 + [8.0] * 4, "two frequencies on its ramp"),  # Ramp bounds undetermined.
    ([1.0] * 8, "factor > 1"),
    ([1.0, 8.0], "one divisor per frequency"),
])
def test_gguf_rope_freqs_that_are_not_llama3_are_refused(factors, match):
  with pytest.raises(ValueError, match=match):
    gguf_io.llama3_rope_scaling(np.array(factors, np.float64), 16, 10000.0)


# --- GGUF conversion cache ---------------------------------------------------------------------


def _write_gguf(path, seed, bpe):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tiny.write_tiny_gguf(path, tiny._tiny_llama(bpe.vocab_size, seed=seed), bpe)  # pylint: disable=protected-access
  return gguf_io.read(path)[1][_EMBED]


def _cached_embedding(folder):
  return safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))[_EMBED]


def test_same_named_ggufs_stay_cached_side_by_side(tmp_path, monkeypatch):
  bpe = tiny._bpe()  # pylint: disable=protected-access
  a, b = str(tmp_path / "a" / "tiny.gguf"), str(tmp_path / "b" / "tiny.gguf")
  want = {a: _write_gguf(a, 0, bpe), b: _write_gguf(b, 1, bpe)}
  work = str(tmp_path / "work")
  calls = []
  convert = pretrained.convert_gguf
  monkeypatch.setattr(pretrained, "convert_gguf", lambda *x: calls.append(x) or convert(*x))
  folders = {}
  for path in (a, b, a, b, a):
    folder = pretrained.prepare(path, work)
    np.testing.assert_array_equal(_cached_embedding(folder), want[path])
    assert folders.setdefault(path, folder) == folder
  assert [c[0] for c in calls] == [a, b]  # Each converted once, not on every switch.
  # The first file keeps the plain name, as before (existing caches stay valid).
  assert folders[a] == os.path.join(work, "pretrained", "tiny") != folders[b]


def test_concurrent_conversions_of_one_file_do_not_clash(tmp_path, monkeypatch):
  """Another process converts the same GGUF while this one is writing its copy."""
  bpe = tiny._bpe()  # pylint: disable=protected-access
  path = str(tmp_path / "tiny.gguf")
  want = _write_gguf(path, 0, bpe)
  folder = str(tmp_path / "work" / "pretrained" / "tiny")
  write = safetensors_io.write_folder
  other_done = []

  def write_then_let_the_other_process_run(*args, **kwargs):
    out = write(*args, **kwargs)
    if not other_done:
      other_done.append(None)
      other_done[0] = pretrained.convert_gguf(path, folder)
    return out

  monkeypatch.setattr(safetensors_io, "write_folder", write_then_let_the_other_process_run)
  assert pretrained.convert_gguf(path, folder) == folder
  assert other_done == [folder]
  np.testing.assert_array_equal(_cached_embedding(folder), want)
  assert os.listdir(os.path.dirname(folder)) == ["tiny"]  # No temporary folder left.
  assert pretrained.prepare(path, str(tmp_path / "work")) == folder


# --- config.json edge cases ---------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    dict(num_key_value_heads=1),  # Multi-query attention.
    dict(head_dim=4, tie_word_embeddings=True),  # head_dim != hidden_size / heads.
    dict(dtype=torch.bfloat16),  # bf16 safetensors.
])
def test_edge_configs_match_transformers(tmp_path, fields):
  dtype = fields.pop("dtype", None)
  model = _hf_llama(**fields)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(str(tmp_path))
  # The reference reads the same file in fp32 (a bf16 model's own RoPE buffer is bf16).
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                                dtype=torch.float32).eval()
  _, cfg, params = _import(str(tmp_path))
  tokens = _tokens(24)
  np.testing.assert_allclose(causal_lm.logits(cfg, params, tokens),
                             _torch_logits(reference, tokens), atol=1e-4, rtol=0)


def test_malformed_tokenizer_config_names_the_file(tmp_path):
  tiny._bpe().hf_tokenizer.save(str(tmp_path / "tokenizer.json"))  # pylint: disable=protected-access
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|eos|>",')
  with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
    tokenizer_lib.PretrainedTokenizer.from_folder(str(tmp_path))
