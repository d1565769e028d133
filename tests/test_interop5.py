"""Hardening of interop tokenizers and HF import: named tokens a file holds as plain added
tokens, Qwen3.5's GGUF pre-tokenizer, quantized checkpoints refused by name, and 0-d
tensors written by the safetensors writer.

transformers (a test-only dependency) is the reference where it has the behaviour.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import tokenizers as hf_tokenizers
import transformers

from blockdiff_jax.data import tokenizers as data_tokenizers
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.model import flops
from blockdiff_jax.model import transformer

CORPUS = ["hello world foo bar baz"] * 8


@pytest.fixture(scope="module")
def trained_json():
  """A trained BPE's tokenizer.json (the eight project specials flagged special)."""
  return data_tokenizers.train_bpe(CORPUS, 300).hf_tokenizer.to_str()


# --- Required names held as plain (non-special) tokens. ---

@pytest.mark.parametrize("plain", [("<|eos|>",), ("<|eos|>", "<|mask|>", "<|bos|>")])
def test_bpe_required_names_held_as_plain_tokens_stay_special(tmp_path, trained_json, plain):
  reference = data_tokenizers.BPETokenizer(hf_tokenizers.Tokenizer.from_str(trained_json))
  data = json.loads(trained_json)
  for added in data["added_tokens"]:  # What tokenizer.add_tokens([...]) writes.
    if added["content"] in plain:
      added["special"] = False
  path = str(tmp_path / "tokenizer.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  tok = data_tokenizers.BPETokenizer.from_file(path)
  assert tok.vocab_size == reference.vocab_size
  assert tok.special_tokens == reference.special_tokens  # Same ids.
  hello = int(tok.encode("hello")[0])
  for name in plain:
    text = f"a{name}b"
    # The module's promise: literal marker text in a document is never the special id.
    assert tok.encode(text).tolist() == reference.encode(text).tolist()
    assert tok.special_tokens[name] not in tok.encode(text).tolist()
    assert tok.decode([hello, tok.special_tokens[name]]) == "hello"
    assert tok.decode([hello, tok.special_tokens[name]], skip_special=False) == "hello" + name


def _chatml_folder(folder, trained_json):
  """A ChatML fine-tune's folder: <|im_start|>/<|im_end|> added with add_tokens (plain)."""
  tok = hf_tokenizers.Tokenizer.from_str(trained_json)
  tok.add_tokens(["<|im_start|>", "<|im_end|>"])
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "bos_token": None, "pad_token": None, "unk_token": None}, f)


def test_pretrained_eos_held_as_a_plain_token_is_special_as_in_transformers(tmp_path,
                                                                          trained_json):
  folder = str(tmp_path / "chatml")
  _chatml_folder(folder, trained_json)
  tok = tokenizer_lib.PretrainedTokenizer.from_folder(folder)
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  eos = tok.eos_id
  assert eos == ref.eos_token_id == tok.vocab_size - 1 and tok.vocab_size == len(ref)
  hello = int(tok.encode("hello")[0])
  ids = [hello, eos, hello]
  assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "hellohello"
  assert tok.decode(ids, skip_special=False) == ref.decode(ids) == "hello<|im_end|>hello"
  # encode() never emits a special: the text of the marker stays text, as it does in
  # transformers with split_special_tokens.
  ref_plain = ref(" a<|im_end|>b", add_special_tokens=False, split_special_tokens=True)
  assert tok.encode(" a<|im_end|>b").tolist() == ref_plain["input_ids"]
  assert eos not in tok.encode(" a<|im_end|>b").tolist()
  assert tok.encode_with_specials("a<|im_end|>").tolist()[-1] == eos
  # <|im_start|> is not named: a plain added token, matched whole as transformers does.
  start = ref.convert_tokens_to_ids("<|im_start|>")
  assert tok.encode("<|im_start|>").tolist() == [start] == ref.encode(
      "<|im_start|>", add_special_tokens=False)
  assert start not in tok.special_ids.tolist()
  # The saved folder says so too.
  out = str(tmp_path / "saved")
  tok.save_pretrained(out)
  again = transformers.AutoTokenizer.from_pretrained(out)
  assert again.decode(ids, skip_special_tokens=True) == "hellohello"


# --- Qwen3.5's GGUF pre-tokenizer. ---

def _qwen35_gguf(path, pre):
  import gguf  # pylint: disable=g-import-not-at-top
  table = tokenizer_lib._bytes_to_unicode()  # pylint: disable=protected-access
  mark = "".join(table[b] for b in "\u0301".encode())  # Two byte symbols.
  tokens = [table[b] for b in range(256)] + [mark, "e" + mark, "<|endoftext|>"]
  w = gguf.GGUFWriter(path, "qwen2")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([1] * (len(tokens) - 1) + [3])
  w.add_token_merges([f"{mark[0]} {mark[1]}", f"e {mark}"])
  w.add_eos_token_id(len(tokens) - 1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("pre", ["qwen35", "qwen2"])
def test_gguf_qwen_pre_tokenizers_match_transformers(tmp_path, pre):
  _qwen35_gguf(str(tmp_path / "tok.gguf"), pre)
  tok = tokenizer_lib.PretrainedTokenizer.from_gguf(str(tmp_path / "tok.gguf"))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
  for text in ("cafe\u0301 au lait", "x\u0301y", "नमस्ते दुनिया", "a  b\n\n c"):
    assert tok.encode(text).tolist() == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(tok.encode(text)) == text
  # Qwen3.5 keeps a combining mark with its letter (one merge: 257); Qwen2 splits it off.
  assert tok.encode("cafe\u0301").tolist()[-1] == (257 if pre == "qwen35" else 256)


# --- Quantized checkpoints. ---

def _export_tiny(folder):
  cfg = transformer.TransformerConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=24)
  rng = np.random.RandomState(0)
  params = flops.param_shapes(cfg)
  params = jax.tree_util.tree_map(lambda s: rng.randn(*s.shape).astype(np.float32), params)
  hf.export(folder, params, cfg)
  return cfg


@pytest.mark.parametrize("quant", [{"quant_method": "fp8", "weight_block_size": [128, 128]},
                                   {"quant_method": "gptq", "bits": 4}])
def test_quantized_checkpoint_is_refused_by_name(tmp_path, quant):
  folder = str(tmp_path / "q")
  _export_tiny(folder)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**config, "quantization_config": quant}, f)
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=f"quantization_config.*{quant['quant_method']}"):
    hf.read_overrides(folder)


def test_unsupported_safetensors_dtype_is_named_not_called_corrupt(tmp_path):
  folder = str(tmp_path / "f8")
  _export_tiny(folder)
  path = os.path.join(folder, "model.safetensors")
  with open(path, "rb") as f:
    raw = f.read()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  name = "model.layers.0.self_attn.q_proj.weight"  # f32 [16, 16]: as many F8 bytes.
  header[name]["dtype"] = "F8_E4M3"
  header[name]["shape"] = [16, 64]
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
  with pytest.raises(ValueError, match="dtype F8_E4M3, which is not supported") as got:
    safetensors_io.SafetensorsFile(path)
  assert not isinstance(got.value, safetensors_io.CorruptCheckpointError)
  assert name in str(got.value)


def test_safetensors_write_keeps_scalar_and_strided_tensors_as_they_are(tmp_path):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  tensors = {"scalar": np.array(3.5, np.float32),
             "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
             "bf16": np.linspace(-2, 2, 6).astype(ml_dtypes.bfloat16).reshape(2, 3),
             "empty": np.zeros((0, 3), np.float16)}
  path = str(tmp_path / "x.safetensors")
  safetensors_io.write(path, tensors)
  ref = st_numpy.load_file(path)  # The reference reader.
  ours = safetensors_io.SafetensorsFile(path)
  for name, want in tensors.items():
    assert ref[name].shape == want.shape == ours.read(name).shape, name
    np.testing.assert_array_equal(ref[name].astype(np.float32), want.astype(np.float32))
    np.testing.assert_array_equal(ours.read(name).astype(np.float32), want.astype(np.float32))
