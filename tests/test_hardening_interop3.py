"""Imports read what llama.cpp and transformers read: GGUF linear RoPE scaling, the
per-architecture defaults of keys absent from config.json (Qwen3's head_dim of 128), and
the variables a chat template sees (tools, documents, every special token)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import test_interop_pretrained as tiny
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from conftest import randomized_hf_model

VOCAB = 61
_bpe = tiny._bpe  # pylint: disable=protected-access
_tiny_llama = tiny._tiny_llama  # pylint: disable=protected-access


def _write_gguf_with(path, model, bpe, monkeypatch, keys):
  """A tiny llama GGUF of ``model`` with extra ``{key: value}`` metadata."""

  class Writer(tiny.gguf.GGUFWriter):

    def write_header_to_file(self, *args, **kwargs):
      for key, value in keys.items():
        add = {str: self.add_string, float: self.add_float32, int: self.add_uint32}[
            type(value)]
        add(key, value)
      return super().write_header_to_file(*args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(tiny.gguf, "GGUFWriter", Writer)
    return tiny.write_tiny_gguf(path, model, bpe)


# --- GGUF linear RoPE scaling ------------------------------------------------------------------


def test_gguf_linear_rope_scaling_matches_transformers(tmp_path, monkeypatch):
  bpe = _bpe()
  torch.manual_seed(0)
  model = randomized_hf_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0},
      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)))
  path = str(tmp_path / "linear.gguf")
  # As llama.cpp's converter writes an HF linear rope_scaling.
  reference = _write_gguf_with(path, model, bpe, monkeypatch, {
      "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
  pre = pretrained.load(path, str(tmp_path / "work"), add_mask=False)
  cfg = hf.transformer_config(pre.model_overrides)
  tokens = np.random.RandomState(0).randint(0, bpe.vocab_size, (1, 24))
  with torch.no_grad():
    want = reference(torch.tensor(tokens)).logits.numpy()
  got = causal_lm.logits(cfg, pre.params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The scaling matters here: without it the logits differ.
  unscaled = hf.transformer_config({**pre.model_overrides, "rope_scaling.type": "none"})
  assert np.abs(causal_lm.logits(unscaled, pre.params, tokens) - want).max() > 1e-2


# llama.cpp (llama-model.cpp): the type defaults to "linear"; the factor is
# rope.scaling.factor, else rope.scale_linear, 0 meaning 1; type "none" never scales
# (llama-context.cpp); rope.scaling.attn_factor multiplies cos and sin.
@pytest.mark.parametrize("keys,want", [
    ({"llama.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    ({"llama.rope.scaling.factor": 3.0, "llama.rope.scale_linear": 2.0},
     {"rope_type": "linear", "factor": 3.0}),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}, None),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    ({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0},
     r"llama\.rope\.scaling\.type='longrope' is not supported"),
    ({"llama.rope.scaling.attn_factor": 2.0}, r"llama\.rope\.scaling\.attn_factor=2\.0"),
    ({"llama.rope.scaling.factor": 0.5}, r"llama\.rope\.scaling\.factor=0\.5 .*only factors >= 1"),
])
def test_gguf_rope_scaling_keys_read_as_llama_cpp_reads_them(tmp_path, monkeypatch, keys, want):
  bpe = _bpe()
  path = str(tmp_path / "tiny.gguf")
  _write_gguf_with(path, _tiny_llama(bpe.vocab_size), bpe, monkeypatch, keys)
  if isinstance(want, str):
    with pytest.raises(architectures.UnsupportedArchitectureError, match=want):
      gguf_io.read(path)
    return
  config, _ = gguf_io.read(path)
  assert config.get("rope_scaling") == want
  scaling_type = architectures.model_overrides(config)["rope_scaling.type"]
  assert scaling_type == (want or {}).get("rope_type", "none")


# --- config.json keys left out -----------------------------------------------------------------

_CLASSES = {
    "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config, "qwen2_moe": transformers.Qwen2MoeConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
}


@pytest.mark.parametrize("model_type", sorted(_CLASSES))
def test_absent_config_keys_take_transformers_defaults(model_type):
  # Only the sizes; every other key as a minimal hand-written config.json leaves it out.
  # 64 heads: a multiple of each class's default KV heads (32, 16, 4), which then apply.
  written = {"model_type": model_type, "vocab_size": VOCAB, "hidden_size": 128,
             "intermediate_size": 48, "num_attention_heads": 64, "num_hidden_layers": 2}
  c = _CLASSES[model_type](**{k: v for k, v in written.items() if k != "model_type"})
  ours = architectures.model_overrides(written)
  # transformers' attention layers read head_dim as getattr(config, "head_dim", d / heads).
  theirs = {
      "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
      "num_kv_heads": c.num_key_value_heads, "mlp_dim": c.intermediate_size,
      "norm_eps": c.rms_norm_eps, "tie_embeddings": c.tie_word_embeddings,
      "rope_theta": c.rope_parameters["rope_theta"],
      "_max_position_embeddings": c.max_position_embeddings,
  }
  if model_type.endswith("moe"):
    theirs.update({"moe.num_experts": c.num_experts, "moe.top_k": c.num_experts_per_tok,
                   "moe.expert_dim": c.moe_intermediate_size,
                   "moe.normalize_topk": c.norm_topk_prob,
                   "moe.shared_expert_dim": getattr(c, "shared_expert_intermediate_size", 0)})
  assert {k: ours.get(k) for k in theirs} == theirs


def test_qwen3_folder_without_head_dim_matches_transformers(tmp_path):
  """Qwen3Config's head_dim defaults to 128, not hidden_size / heads (8 here)."""
  folder = str(tmp_path)
  torch.manual_seed(0)
  model = randomized_hf_model(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)))
  model.save_pretrained(folder)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    written = json.load(f)
  del written["head_dim"]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(written, f)
  reference = transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                                dtype=torch.float32).eval()
  assert reference.config.head_dim == 128
  cfg = hf.transformer_config(hf.read_overrides(folder))
  params = hf.load_params(folder, cfg)
  tokens = np.random.RandomState(1).randint(0, VOCAB, (1, 10))
  with torch.no_grad():
    want = reference(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(causal_lm.logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


def test_sliding_window_of_default_length_is_refused():
  """use_sliding_window without a sliding_window key slides 4096-token windows."""
  written = {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32,
             "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_hidden_layers": 2, "use_sliding_window": True, "max_window_layers": 1}
  c = transformers.Qwen2Config(**{k: v for k, v in written.items() if k != "model_type"})
  assert c.layer_types == ["full_attention", "sliding_attention"]
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"\(sliding_window=4096\) makes layers \[1\]"):
    architectures.model_overrides(written)


# --- chat templates ----------------------------------------------------------------------------

# Mistral-style tests of tools / documents, and the special tokens besides bos and eos.
_TEMPLATE = ("{% if tools is not none %}[TOOLS]{{ tools | tojson }}{% endif %}"
             "{% if documents is not none %}[DOCS]{% endif %}"
             "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|"
             "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}")


def test_chat_template_sees_what_transformers_passes_it(tmp_path, monkeypatch):
  bpe = _bpe()
  path = str(tmp_path / "tiny.gguf")
  unk = bpe.hf_tokenizer.token_to_id("<|sep|>")  # Distinct from every other special.
  keys = {"tokenizer.ggml.unknown_token_id": unk,
          "tokenizer.ggml.padding_token_id": bpe.pad_id}
  _write_gguf_with(path, _tiny_llama(bpe.vocab_size), bpe, monkeypatch, keys)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
  ours = pretrained.load_tokenizer(path, str(tmp_path / "work"), add_mask=False)
  ours.chat_template = _TEMPLATE
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi <|eos|> there"}]
  want = ref.apply_chat_template(messages, tokenize=False, chat_template=_TEMPLATE,
                                 add_generation_prompt=True)
  assert ours.apply_chat_template(messages) == want
  assert "|<|sep|>|" in want  # The GGUF's unknown token reached the template.
