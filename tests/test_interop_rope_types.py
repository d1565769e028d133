"""Linear and YaRN RoPE scaling through HF import, HF export and the training config path;
"dynamic" (HF) and "ntk" (ours) have no exact counterpart and are refused."""

import dataclasses
import json
import os

import ml_collections
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from blockdiff_jax import config as config_lib
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.model import build
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from conftest import randomized_hf_model

VOCAB = 97
ORIGINAL = 32  # Pre-training context of the tiny models; the tests run three times past it.

# Every YaRN field away from its default: ramp bounds at indices 0.92 and 4.03 of 8 (so
# beta_fast, beta_slow and truncate=False each move them), the DeepSeek temperature
# ratio, and an explicit temperature that overrides it.
YARN_ALL_FIELDS = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL, "beta_fast": 3.0,
                   "beta_slow": 0.5, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}
YARN_EXPLICIT_TEMPERATURE = {**YARN_ALL_FIELDS, "attention_factor": 1.3}
# How Qwen2.5 documents running at 128k (before transformers 5: rope_scaling with "type").
QWEN25_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
LINEAR = {"rope_type": "linear", "factor": 4.0}


def _hf_model(model_type, seed=0, **fields):
  """A tiny random Llama/Qwen2 causal LM (norms and biases random too)."""
  torch.manual_seed(seed)
  fields = dict(dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, max_position_embeddings=4 * ORIGINAL, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None), **fields)
  if model_type == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
  return randomized_hf_model(model)


def _save_with_rope(model, folder, rope_parameters):
  """Saves ``model`` with these RoPE parameters written into its config.json.

  A ``"type"`` key writes them the way hub files from before transformers 5 do
  (top-level rope_theta plus a rope_scaling dict).
  """
  model.save_pretrained(folder)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  theta = config.pop("rope_parameters")["rope_theta"]
  if "type" in rope_parameters:
    config.update({"rope_theta": theta, "rope_scaling": rope_parameters})
  else:
    config["rope_parameters"] = {"rope_theta": theta, **rope_parameters}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _tokens(length=3 * ORIGINAL):
  return np.random.RandomState(1).randint(0, VOCAB, (2, length)).astype(np.int64)


def _import(folder):
  overrides = hf.read_overrides(folder)
  cfg = hf.transformer_config(overrides)
  return overrides, cfg, hf.load_params(folder, cfg)


# --- import -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,rope_parameters", [
    ("qwen2", QWEN25_YARN),
    ("llama", YARN_ALL_FIELDS),
    ("llama", YARN_EXPLICIT_TEMPERATURE),
    ("llama", LINEAR),
    ("qwen2", {"type": "linear", "factor": 2.5}),
])
def test_imported_scaling_matches_transformers_past_the_original_length(
    tmp_path, model_type, rope_parameters):
  reference = _save_with_rope(_hf_model(model_type), str(tmp_path), rope_parameters)
  assert reference.config.rope_parameters["rope_type"] == rope_parameters.get(
      "rope_type", rope_parameters.get("type"))
  overrides, cfg, params = _import(str(tmp_path))
  tokens = _tokens()
  want = _torch_logits(reference, tokens)
  np.testing.assert_allclose(causal_lm.logits(cfg, params, tokens), want, atol=1e-4, rtol=0)
  # The scaling matters: plain RoPE computes another model.
  plain = hf.transformer_config({**overrides, "rope_scaling.type": "none"})
  assert np.abs(causal_lm.logits(plain, params, tokens) - want).max() > 0.1


def test_yarn_import_fills_in_transformers_defaults():
  config = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 8, "rope_theta": 1e6,
            "max_position_embeddings": 131072,
            "rope_scaling": {"type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 32768}}
  o = architectures.model_overrides(config)
  assert hf.transformer_config(o).rope_scaling == rope.RopeScaling(
      "yarn", 4.0, 32768, beta_fast=32.0, beta_slow=1.0, truncate=True)
  # A null factor: transformers takes max_position / original.
  config["rope_scaling"]["factor"] = None
  config["rope_scaling"]["original_max_position_embeddings"] = 16384
  scaling = hf.transformer_config(architectures.model_overrides(config)).rope_scaling
  want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.Qwen2Config(**config), "cpu")
  got, got_factor = rope.inverse_frequencies(16, 1e6, scaling)
  assert scaling.factor == 8.0
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
  np.testing.assert_allclose(got_factor, want_factor, rtol=1e-12)


def test_dynamic_import_is_refused_naming_the_static_alternative():
  config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 8,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"'dynamic'.*rope_scaling\.type='ntk'"):
    architectures.model_overrides(config)


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_parameters", [YARN_EXPLICIT_TEMPERATURE, YARN_ALL_FIELDS, LINEAR])
def test_export_round_trips_through_transformers(tmp_path, rope_parameters):
  src, out = str(tmp_path / "src"), str(tmp_path / "out")
  reference = _save_with_rope(_hf_model("llama"), src, rope_parameters)
  overrides, cfg, params = _import(src)
  hf.export(out, params, cfg, overrides)
  assert hf.read_hf_config(out)["rope_parameters"] == {"rope_theta": 10000.0, **rope_parameters}
  assert hf.read_hf_config(out)["rope_scaling"] == {
      k: v for k, v in rope_parameters.items() if k != "rope_theta"}
  assert hf.read_overrides(out) == overrides
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = _tokens()
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(reference, tokens),
                             atol=1e-5, rtol=0)


def test_export_writes_the_scaling_cfg_computes(tmp_path):
  """A model built here, and one given YaRN after an import without scaling."""
  plain = transformer.TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                                        num_kv_heads=2, head_dim=16, mlp_dim=48,
                                        tie_embeddings=False)
  params = build.init_params(transformer.Transformer(plain), 0)
  cfg = dataclasses.replace(plain, rope_scaling=rope.RopeScaling(
      "yarn", 3.0, ORIGINAL, beta_fast=16.0, truncate=False, attention_factor=1.2))
  tokens = _tokens()
  for name, overrides in (("fresh", None), ("imported", hf.config_overrides(plain))):
    out = str(tmp_path / name)
    hf.export(out, params, cfg, overrides)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens),
                               causal_lm.logits(cfg, params, tokens), atol=1e-4, rtol=0)
    assert hf.transformer_config(hf.read_overrides(out)).rope_scaling == cfg.rope_scaling


def test_export_refuses_static_ntk(tmp_path):
  cfg = transformer.TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                                      num_kv_heads=2, head_dim=16, mlp_dim=48,
                                      rope_scaling=rope.RopeScaling("ntk", 4.0))
  params = build.init_params(transformer.Transformer(cfg), 0)
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match="rope_scaling.type='ntk' has no Hugging Face equivalent"):
    hf.export(str(tmp_path / "out"), params, cfg)
  assert not os.path.exists(str(tmp_path / "out"))


# --- the training config path (init.pretrained) ---------------------------------------------


def _yarn_overrides(rope_parameters):
  return architectures.model_overrides({
      "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1,
      "num_attention_heads": 4, "intermediate_size": 8, "max_position_embeddings": 128,
      "rope_parameters": {"rope_theta": 10000.0, **rope_parameters}})


@pytest.mark.parametrize("rope_parameters", [YARN_EXPLICIT_TEMPERATURE, YARN_ALL_FIELDS,
                                             LINEAR])
def test_imported_scaling_survives_the_training_config_path(rope_parameters):
  overrides = _yarn_overrides(rope_parameters)
  c = config_lib.base_config()
  # An earlier explicit temperature must not outlive an import without one.
  c.model.rope_scaling.attention_factor = 2.0
  pretrained.apply_overrides(c.model, overrides)
  config_lib.validate(c)
  want = hf.transformer_config(overrides).rope_scaling
  assert transformer.TransformerConfig.from_config(c.model, VOCAB).rope_scaling == want
  # Through a saved and reloaded config.json, too.
  loaded = ml_collections.ConfigDict(json.loads(c.to_json_best_effort()))
  assert transformer.TransformerConfig.from_config(loaded.model, VOCAB).rope_scaling == want


def test_config_saved_before_the_yarn_fields_still_loads():
  c = config_lib.base_config()
  saved = json.loads(c.to_json_best_effort())
  for name in ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale",
               "mscale_all_dim", "low_freq_factor", "high_freq_factor"):
    del saved["model"]["rope_scaling"][name]
  saved["model"]["rope_scaling"].update(type="yarn", factor=2.0, original_max_position=64)
  loaded = ml_collections.ConfigDict(saved)
  config_lib.validate(loaded)
  assert transformer.TransformerConfig.from_config(loaded.model, VOCAB).rope_scaling == (
      rope.RopeScaling("yarn", 2.0, 64))


@pytest.mark.parametrize("field,value", [("beta_fast", 0.0), ("beta_slow", -1.0),
                                         ("attention_factor", -0.5),
                                         ("original_max_position", 0)])
def test_validation_names_a_bad_yarn_field(field, value):
  c = config_lib.base_config()
  c.model.rope_scaling.type = "yarn"
  c.model.rope_scaling[field] = value
  with pytest.raises(ValueError, match=f"rope_scaling.{field}"):
    config_lib.validate(c)
