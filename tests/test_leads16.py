"""Leads from the session-16 hardening wave: special ids given as a set to the likelihood
evaluation, and a GGUF whose V head size differs from K's."""

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import routing_sweep
from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer


class _Rows:
  """One batch of two rows; token 3 is a special (EOS-like) scored token."""

  def get_batch(self, i):
    del i
    return {"tokens": jnp.array([[5, 6, 3, 7], [3, 3, 5, 6]], jnp.int32),
            "loss_mask": jnp.ones((2, 4), jnp.float32)}


@pytest.fixture(scope="module")
def tiny():
  cfg = transformer.TransformerConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=16)
  model = transformer.Transformer(cfg)
  meta = masks.make_meta(jnp.arange(4)[None], 2, masks.CLEAN)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                        meta)["params"])
  return build.make_apply(model), params


@pytest.mark.parametrize("special", [{3}, frozenset({3}), (i for i in [3])])
def test_special_ids_of_any_iterable_count_as_a_list_of_them(tiny, special):
  """A set failed inside np.asarray (a 0-d object array), far from the argument."""
  _apply, params = tiny
  obj = losses.BlockDiffusionObjective(block_size=2, mask_id=4)
  want = likelihood.evaluate(_apply, params, _Rows(), obj, 1, 1, bytes_per_token=1.0,
                             special_ids=[3])
  got = likelihood.evaluate(_apply, params, _Rows(), obj, 1, 1, bytes_per_token=1.0,
                            special_ids=special)
  assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"])
  # 8 scored tokens, 3 of them special: bits/byte is over the 5 text tokens.
  assert got["bits_per_byte"] != pytest.approx(
      likelihood.evaluate(_apply, params, _Rows(), obj, 1, 1, bytes_per_token=1.0)["bits_per_byte"])


def _gguf(path, value_length):
  w = gguf.GGUFWriter(path, "llama")
  for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 8,
                     "feed_forward_length": 16, "attention.head_count": 2,
                     "attention.head_count_kv": 1, "vocab_size": 32,
                     "attention.key_length": 4, "attention.value_length": value_length}.items():
    w.add_uint32(f"llama.{key}", value)
  w.add_tensor("token_embd.weight", np.ones((32, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_value_length_other_than_the_key_length_is_refused(tmp_path):
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"v\.gguf: llama\.attention\.value_length=8 differs from the key"):
    gguf_io.read(_gguf(str(tmp_path / "v.gguf"), 8))
  hf_config, _ = gguf_io.read(_gguf(str(tmp_path / "same.gguf"), 4))  # Equal: read.
  assert hf_config["head_dim"] == 4


def test_dmoe_sweep_reads_e_over_2_of_one_expert_as_zero(monkeypatch):
  """``get(m) or int(m)`` fell through to int("E/2") when E/2 is 0 (one expert)."""
  import types  # pylint: disable=g-import-not-at-top
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  mod = load_experiment("dmoe_coverage_sweep")
  seen = {}

  class _Stop(Exception):
    pass

  def settings_grid(e, k, coverages, mins):
    seen.update(e=e, k=k, mins=list(mins))
    raise _Stop

  monkeypatch.setattr(routing_sweep, "settings_grid", settings_grid)
  moe = types.SimpleNamespace(num_experts=1, top_k=1)
  loaded = (None, types.SimpleNamespace(cfg=types.SimpleNamespace(moe=moe)), None, None)
  args = types.SimpleNamespace(coverages="0.5", min_sizes="k,E/2,2k,3")
  with pytest.raises(_Stop):
    mod.sweep_model("m", "/nonexistent", args, loaded=loaded)
  assert seen == {"e": 1, "k": 1, "mins": [1, 0, 2, 3]}


@pytest.mark.parametrize("error,param", [
    ("message 1: the role 'x<|eos|>' holds special-token text", "messages[1].role"),
    ("message 0: the reasoning_content holds special-token text, and only a str content",
     "messages[0].reasoning_content"),
    ("message 0: the content holds special-token text, and only a str content",
     "messages[0].content"),
    ("message 1 holds special-token text and the chat template does not", "messages[1].content"),
    ("message 5 holds special-token text", "messages"),  # Past the request's messages.
    ("the template failed", "messages"),
])
def test_a_chat_encoding_error_names_the_field_it_is_about(error, param):
  """A reasoning_content refusal was attributed to messages[i].content."""
  from blockdiff_jax.serving import server  # pylint: disable=g-import-not-at-top
  assert server._message_field(error, 2) == param  # pylint: disable=protected-access


def test_byte_decode_joins_a_character_split_by_a_dropped_special():
  """Bytes 0xC3 MASK 0xA9 decoded as two U+FFFD; the library tokenizers give the 'é'."""
  from blockdiff_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.ByteTokenizer()
  ids = [ord("a"), 0xC3, tok.mask_id, 0xA9, tok.eos_id, ord("b")]
  assert tok.decode(ids) == "aéb"
  # Kept, a special still splits the bytes: its name sits between them.
  kept = tok.decode(ids, skip_special=False)
  assert kept.startswith("a\ufffd") and kept.endswith("b") and "\ufffd" in kept[2:]


# --- Padding and half precision in the scorers the diffmask wave left (its leads). ---

_VOCAB = 70_000  # Past float16's largest finite value (65,504): its softmax sum overflows.


def _flat_apply(dtype):
  row = ((jnp.arange(_VOCAB) % 89) / 2000.0).astype(dtype)

  def apply_fn(params, tokens, meta, logits_slice=None):
    del params, meta, logits_slice
    return jnp.broadcast_to(row, tokens.shape + (_VOCAB,)), {}
  return apply_fn, np.asarray(row.astype(jnp.float32), np.float64)


def test_introspective_ce_of_float16_logits_is_the_float64_one():
  """The introspective CE normalized float16 logits in float16: every NLL was inf."""
  from blockdiff_jax.diffusion import introspective  # pylint: disable=g-import-not-at-top
  apply_fn, row = _flat_apply(jnp.float16)
  tokens = jnp.array([[3, 500, 12_345, 69_000]], jnp.int32)
  obj = introspective.IntrospectiveObjective(stride=2, mask_id=_VOCAB - 1)
  got = introspective.per_token_ce(apply_fn, None, {"tokens": tokens,
                                                    "loss_mask": jnp.ones((1, 4))}, obj)
  ref = row[:_VOCAB - 1]  # MASK is never predicted.
  want = ref.max() + np.log(np.sum(np.exp(ref - ref.max()))) - ref[np.asarray(tokens[0, 1:])]
  for key in ("clean_nll", "noisy_nll"):
    np.testing.assert_allclose(np.asarray(got[key][0], np.float64), want, rtol=1e-5)


def test_introspective_never_targets_padding():
  """Two padding tokens share segment -1, so the second was a scored target."""
  from blockdiff_jax.diffusion import introspective  # pylint: disable=g-import-not-at-top
  seg = jnp.array([[0, 0, 1, 1, -1, -1, -1]], jnp.int32)
  weight = introspective._target_weight(  # pylint: disable=protected-access
      {"loss_mask": jnp.ones((1, 7)), "segment_ids": seg})
  np.testing.assert_array_equal(np.asarray(weight), [[1, 0, 1, 0, 0, 0]])


def test_likelihood_counts_the_tokens_corrupt_may_mask(tiny):
  """Padding under a loss mask of ones was counted as scored but never masked."""
  apply_fn, params = tiny
  tokens = jnp.array([[5, 6, 3, 7], [5, 6, 0, 0]], jnp.int32)
  seg = jnp.array([[0, 0, 0, 0], [0, 0, -1, -1]], jnp.int32)
  obj = likelihood.evaluation_objective(losses.BlockDiffusionObjective(block_size=2,
                                                                       mask_id=4))
  nats, scored = likelihood.per_sequence_sums(
      apply_fn, params, {"tokens": tokens, "loss_mask": jnp.ones((2, 4)),
                         "segment_ids": seg}, jax.random.key(0), obj)
  np.testing.assert_array_equal(np.asarray(scored), [4, 2])
  _, scored_zeroed = likelihood.per_sequence_sums(
      apply_fn, params, {"tokens": tokens, "loss_mask": (seg >= 0).astype(jnp.float32),
                         "segment_ids": seg}, jax.random.key(0), obj)
  np.testing.assert_array_equal(np.asarray(scored_zeroed), [4, 2])
  assert np.all(np.isfinite(np.asarray(nats)))


def test_routing_sweep_weighs_masked_metrics_by_the_maskable_tokens():
  """The masked count rebuilt from masked_fraction used loss_mask > 0, padding included,
  where the fraction is of the maskable tokens (losses.maskable)."""
  batch = {"loss_mask": jnp.ones((1, 8)),
           "segment_ids": jnp.array([[0, 0, 0, 0, 0, 0, -1, -1]], jnp.int32)}
  metrics = {losses.LOSS_TOKENS: jnp.float32(6.0), "masked_fraction": jnp.float32(0.5),
             "nelbo": jnp.float32(1.0), "masked_ce": jnp.float32(2.0),
             "masked_accuracy": jnp.float32(0.25)}
  obj = losses.BlockDiffusionObjective(block_size=2, mask_id=4)
  terms = routing_sweep._quality_terms(obj, batch, metrics)  # pylint: disable=protected-access
  assert float(terms["masked_ce"][1]) == 3.0 and float(terms["nelbo"][1]) == 6.0


def test_a_seed_past_32_bits_is_refused():
  """jax.random.key keeps a seed's low 32 bits: 2**32 + 5 trained seed 5's model."""
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert np.array_equal(jax.random.key_data(jax.random.key(2**32 + 5)),
                        jax.random.key_data(jax.random.key(5)))
  c = config_lib.base_config()
  c.seed = 2**32 + 5
  with pytest.raises(ValueError, match=r"seed must be below 2\*\*32, got 4294967301"):
    config_lib.validate(c)
  c.seed = 2**32 - 1
  config_lib.validate(c)


# --- Optional special ids past the vocabulary: none, as llama.cpp (reviewer11). ---


def _tokens():
  from blockdiff_jax.interop import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  table = tokenizer_lib._bytes_to_unicode()  # pylint: disable=protected-access
  return [table[b] for b in range(256)] + ["<|im_start|>", "<|im_end|>"]


def test_gguf_padding_id_past_the_vocabulary_loads_as_none(tmp_path, caplog):
  """padding_token_id 2**32 - 1 (uint32 -1) is found in the wild; llama.cpp warns and
  loads. The tokenizer's id check refused the whole file."""
  import logging  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "tok.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_tokenizer_model("gpt2")
  w.add_token_list(_tokens() + ["ab"])
  w.add_token_types([1] * 256 + [3, 3, 1])
  w.add_token_merges(["a b"])
  w.add_eos_token_id(257)
  w.add_pad_token_id(2**32 - 1)
  w.add_bos_token_id(256)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with caplog.at_level(logging.WARNING):
    tok = tokenizer_lib.PretrainedTokenizer.from_gguf(path)
  assert tok.eos_id == 257 and tok.bos_id == 256
  assert tok.pad_id == 257  # No pad of its own: the pipeline pads with eos.
  assert any("padding_token_id=4294967295" in r.getMessage() for r in caplog.records)


def test_folder_config_pad_id_of_minus_one_loads_as_none(tmp_path):
  """Llama-style config.json files carry pad_token_id: -1 (no pad)."""
  import json  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  hf = tokenizer_lib.hf_tokenizer_from_gguf({"model": "gpt2", "pre": "gpt2", "merges": [],
                                             "tokens": _tokens(),
                                             "token_type": [1] * 256 + [3, 3]})
  hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 257, "pad_token_id": -1,
                                                    "bos_token_id": 256}))
  tok = tokenizer_lib.PretrainedTokenizer.from_folder(str(tmp_path))
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (257, 256, 257)
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 300}))
  with pytest.raises(ValueError, match="eos token id 300 is not an id"):
    tokenizer_lib.PretrainedTokenizer.from_folder(str(tmp_path))


def test_lora_config_section_with_a_string_of_targets_is_refused():
  """from_config turned "qv" into ("q", "v") before LoraConfig could refuse the str."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import lora  # pylint: disable=g-import-not-at-top
  section = ml_collections.ConfigDict({"rank": 2, "alpha": 4.0, "targets": "qv",
                                       "gated": False, "mask_id": -1})
  with pytest.raises(ValueError, match="not the string 'qv'"):
    lora.from_config(section)


def test_moe_combine_keeps_the_bf16_copies_for_the_backward(capsys):
  """Summed in fp32, the backward saved an fp32 copy of [N*k, D]; rematerialized, the
  bf16 copies (and the router weights) are what it keeps."""
  from jax import ad_checkpoint  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import moe  # pylint: disable=g-import-not-at-top
  ys, w = jnp.ones((64 * 4, 32), jnp.bfloat16), jnp.full((64, 4), 0.25)
  capsys.readouterr()
  ad_checkpoint.print_saved_residuals(
      lambda y, w: moe.combine(y, w).astype(jnp.float32).sum(), ys, w)
  saved = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines())
  assert saved == ["bf16[64,4,32]", "f32[64,4]"], saved


def test_bits_per_byte_counts_only_the_maskable_text(tiny):
  """Padding under a loss mask of ones counted as text tokens (bits/byte too low)."""
  apply_fn, params = tiny

  class _Padded:
    def get_batch(self, i):
      del i
      return {"tokens": jnp.array([[5, 6, 3, 7], [5, 6, 0, 0]], jnp.int32),
              "loss_mask": jnp.ones((2, 4)),
              "segment_ids": jnp.array([[0, 0, 0, 0], [0, 0, -1, -1]], jnp.int32)}

  obj = losses.BlockDiffusionObjective(block_size=2, mask_id=4)
  res = likelihood.evaluate(apply_fn, params, _Padded(), obj, 1, 1, bytes_per_token=1.0,
                            special_ids=[3])
  # Text: 3 + 2 tokens (token 3 is special, the padding is not scored).
  assert res["scored_tokens"] == 6 and res["text_tokens"] == 5, res
