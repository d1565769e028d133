"""Imported models never silently drop a config field that changes the math.

Each field that changes transformers' forward pass is either honoured (logits match
transformers on the same folder) or refused with an error naming the field and value;
export writes a max_position_embeddings its RoPE agrees with; GGUF keys llama.cpp computes
with are honoured or refused; same-named GGUFs converted at once keep their own weights.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_numpy

import test_interop_pretrained as tiny
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.model import build
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from conftest import randomized_hf_model

VOCAB = 61
_tiny_llama = tiny._tiny_llama  # pylint: disable=protected-access
_bpe = tiny._bpe  # pylint: disable=protected-access
ORIGINAL = 16  # Pre-training length of the scaled-RoPE cases; the tokens run 3x past it.
_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 4 * ORIGINAL}
YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
        "original_max_position_embeddings": 4 * ORIGINAL}


def _hf_config(model_type, **fields):
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=8 * ORIGINAL, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if model_type.endswith("moe"):
    common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
  return _CLASSES[model_type][0](**{**common, **fields})


def _save(folder, model_type, fields, top_level, with_weights):
  """Saves a tiny random model (or only its config.json) with ``top_level`` keys written
  into config.json as a hub file would have them; returns transformers' model of it."""
  config = _hf_config(model_type, **fields)
  if with_weights:
    torch.manual_seed(0)
    randomized_hf_model(_CLASSES[model_type][1](config)).save_pretrained(folder)
  else:
    config.save_pretrained(folder)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    written = json.load(f)
  written.update(top_level)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(written, f)
  if with_weights:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return None


# (model_type, constructor fields, config.json keys, None = logits match transformers,
#  else the refusal's message).
CASES = {
    # Phi-3 style: a top-level original length wins over the one in rope_parameters
    # (transformers' standardize_rope_params); llama3 then ramps other frequencies.
    "top_level_original_llama3": ("llama", dict(rope_parameters=LLAMA3),
                                  {"original_max_position_embeddings": ORIGINAL}, None),
    # A null YaRN factor is max_position_embeddings / that top-level original length.
    "top_level_original_yarn": ("llama", dict(rope_parameters=dict(YARN, factor=None)),
                                {"original_max_position_embeddings": ORIGINAL}, None),
    # transformers' ACT2FN maps "swish" to the same SiLU.
    "hidden_act_swish": ("llama", dict(hidden_act="swish"), {}, None),
    # A window on no layer (they all sit below max_window_layers) is full attention.
    "sliding_window_on_no_layer": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=2), {}, None),
    "partial_rotary_factor": ("llama", {}, {"partial_rotary_factor": 0.5},
                              r"partial_rotary_factor=0\.5"),
    "partial_rotary_factor_in_rope_parameters": (
        "qwen3", {}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                          "partial_rotary_factor": 0.25}},
        r"partial_rotary_factor=0\.25"),
    "rope_parameters_by_layer_type": (
        "qwen2", {}, {"rope_parameters": {"full_attention": YARN}},
        r"rope_parameters nested by layer type \(full_attention\)"),
    "sliding_window_on_a_layer": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                                max_window_layers=1), {},
                                  r"layer_types=\['full_attention', 'sliding_attention'\] "
                                  r"\(sliding_window=4\) makes layers \[1\]"),
    "layer_types_sliding_without_use": ("qwen2_moe", {}, {
        "layer_types": ["sliding_attention", "full_attention"]},
        r"layer_types=\['sliding_attention', 'full_attention'\].*layers \[0\]"),
    "sliding_window_qwen3_moe": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4),
                                {}, r"use_sliding_window=True \(sliding_window=4\) makes layers "
                                    r"\[0, 1\]"),
    "hidden_act_gelu": ("llama", dict(hidden_act="gelu"), {}, r"hidden_act='gelu'"),
    "attention_bias": ("qwen3", dict(attention_bias=True), {}, r"attention_bias=True"),
    "mlp_bias": ("llama", dict(mlp_bias=True), {}, r"mlp_bias=True"),
    "rope_type_longrope": ("llama", {}, {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8, "original_max_position_embeddings": ORIGINAL}},
        r"rope type 'longrope'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_field_is_honoured_or_refused(tmp_path, case):
  model_type, fields, top_level, refusal = CASES[case]
  folder = str(tmp_path)
  reference = _save(folder, model_type, fields, top_level, with_weights=refusal is None)
  if refusal is not None:
    with pytest.raises(architectures.UnsupportedArchitectureError, match=refusal):
      hf.read_overrides(folder)
    return
  overrides = hf.read_overrides(folder)
  cfg = hf.transformer_config(overrides, moe_impl="dense")
  params = hf.load_params(folder, cfg)
  tokens = np.random.RandomState(1).randint(0, VOCAB, (1, 3 * ORIGINAL))
  with torch.no_grad():
    want = reference(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(causal_lm.logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


# --- export: max_position_embeddings --------------------------------------------------------


@pytest.fixture(scope="module")
def plain_model():
  cfg = transformer.TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                                      num_kv_heads=2, head_dim=16, mlp_dim=48)
  return cfg, build.init_params(transformer.Transformer(cfg), 0)


@pytest.mark.parametrize("scaling,imported_length,want", [
    # transformers warns when max_position / original != a YaRN factor (8192 / 32 here).
    (rope.RopeScaling("yarn", 3.0, 32), None, 96),
    # An import of 128 positions extended here past it: not the imported 128.
    (rope.RopeScaling("yarn", 4.0, 2048), 128, 8192),
    # llama3 has no such relation (Llama 3.1: 8192 x 8 != 131072): the imported value.
    (rope.RopeScaling("llama3", 8.0, 32, low_freq_factor=1.0, high_freq_factor=4.0), 128, 128),
    (rope.RopeScaling(), 128, 128),  # Unchanged since the import: its own value.
])
def test_export_writes_the_context_its_rope_reaches(tmp_path, plain_model, scaling,
                                                     imported_length, want):
  plain, params = plain_model
  cfg = dataclasses.replace(plain, rope_scaling=scaling)
  overrides = None
  if imported_length:
    overrides = {**hf.config_overrides(plain), "_model_type": "llama",
                 "_max_position_embeddings": imported_length}
  hf.export(str(tmp_path), params, cfg, overrides)
  loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert loaded.max_position_embeddings == want
  if scaling.type == "yarn":  # The ratio transformers checks a YaRN factor against.
    assert want / loaded.rope_parameters["original_max_position_embeddings"] == (
        loaded.rope_parameters["factor"])


# --- GGUF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("llama.rope.dimension_count", 8, r"llama\.rope\.dimension_count=8 \(RoPE on only part "
                                      r"of each head of 16\)"),
    # Linear scaling is honoured (test_hardening_interop3); its attention factor is not.
    ("llama.rope.scaling.attn_factor", 2.0, r"llama\.rope\.scaling\.attn_factor=2\.0"),
])
def test_gguf_rope_keys_llama_cpp_computes_with_are_refused(tmp_path, monkeypatch, key, value,
                                                           match):
  class Writer(tiny.gguf.GGUFWriter):

    def write_header_to_file(self, *args, **kwargs):
      (self.add_uint32 if isinstance(value, int) else self.add_float32)(key, value)
      return super().write_header_to_file(*args, **kwargs)

  monkeypatch.setattr(tiny.gguf, "GGUFWriter", Writer)
  bpe = _bpe()
  path = str(tmp_path / "tiny.gguf")
  tiny.write_tiny_gguf(path, _tiny_llama(bpe.vocab_size), bpe)
  with pytest.raises(architectures.UnsupportedArchitectureError, match=match):
    gguf_io.read(path)


def test_same_named_ggufs_converted_at_once_keep_their_own_weights(tmp_path, monkeypatch):
  """Process B converts b/tiny.gguf into the plain folder while A converts a/tiny.gguf."""
  bpe = _bpe()
  a, b = str(tmp_path / "a" / "tiny.gguf"), str(tmp_path / "b" / "tiny.gguf")
  want = {}
  for seed, path in enumerate((a, b)):
    os.makedirs(os.path.dirname(path))
    tiny.write_tiny_gguf(path, _tiny_llama(bpe.vocab_size, seed=seed), bpe)
    want[path] = gguf_io.read(path)[1]["model.embed_tokens.weight"]
  work = str(tmp_path / "work")
  install = pretrained._install  # pylint: disable=protected-access
  folders = {}

  def let_b_finish_first(*args):
    if not folders:
      folders[b] = None  # B's own install must not start a third conversion.
      folders[b] = pretrained.prepare(b, work)
    return install(*args)

  monkeypatch.setattr(pretrained, "_install", let_b_finish_first)
  folders[a] = pretrained.prepare(a, work)
  assert folders[a] != folders[b]
  for path, folder in folders.items():  # B's folder was not replaced under it.
    got = safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], want[path])
  monkeypatch.undo()
  assert pretrained.prepare(a, work) == folders[a] and pretrained.prepare(b, work) == folders[b]
