"""GGUF / safetensors readers and writers on edge inputs: big-endian GGUF tensors, metadata
of the wrong type, Q/K rows the metadata does not describe, malformed names; safetensors
headers, indexes and arrays the format allows or refuses; config.json that is not one."""

import json
import struct

import gguf
import numpy as np
import pytest

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import safetensors_io

# --- GGUF -----------------------------------------------------------------------------------

_BASE_KEYS = {"block_count": 1, "context_length": 64, "embedding_length": 8,
              "feed_forward_length": 16, "attention.head_count": 2,
              "attention.head_count_kv": 1, "vocab_size": 32}
_EMB = np.arange(32 * 8, dtype=np.float32).reshape(32, 8) - 100.0  # Exact in F16 too.


def _gguf(path, tensors=(), keys=None, endian=gguf.GGUFEndian.LITTLE):
  """A llama GGUF (1 layer, d=8, 2 heads / 1 KV head of 4) with these tensors and keys.

  tensors: (name, array[, raw GGML type]); keys: {key: value}, a value of None drops the
  key, a str/float/int/list is written as that GGUF type.
  """
  w = gguf.GGUFWriter(path, "llama", endianess=endian)
  for key, value in {**_BASE_KEYS, **(keys or {})}.items():
    if value is None:
      continue
    add = {str: w.add_string, float: w.add_float32, int: w.add_uint32,
           list: w.add_array}[type(value)]
    add(f"llama.{key}", value)
  for name, a, *raw in tensors:
    w.add_tensor(name, a, raw_dtype=raw[0] if raw else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_big_endian_gguf_float_tensors_read_as_their_values(tmp_path, dtype):
  # The gguf package's dequantizer views the reader's byte-swapped arrays in host order.
  path = _gguf(str(tmp_path / "be.gguf"), [("token_embd.weight", _EMB.astype(dtype))],
               endian=gguf.GGUFEndian.BIG)
  _, tensors = gguf_io.read(path)
  np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], _EMB)


def test_big_endian_gguf_quantized_tensor_is_refused_by_name(tmp_path):
  q = gguf.quants.quantize(np.ones((32, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
  path = _gguf(str(tmp_path / "be.gguf"),
               [("token_embd.weight", q, gguf.GGMLQuantizationType.Q8_0)],
               keys={"embedding_length": 32}, endian=gguf.GGUFEndian.BIG)
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"be\.gguf: tensor 'token_embd\.weight' has GGML type Q8_0 .*big"):
    gguf_io.read(path)


@pytest.mark.parametrize("name,rows,match", [
    ("blk.0.attn_q.weight", 7, r"head_count=2 heads of size 4 need 8 rows"),  # numpy error.
    # 6 rows "unpermuted" as one head of 6: silently scrambled before.
    ("blk.0.attn_k.weight", 6, r"head_count_kv=1 heads of size 4 need 4 rows"),
])
def test_gguf_qk_rows_the_metadata_does_not_describe_are_named(tmp_path, name, rows, match):
  path = _gguf(str(tmp_path / "m.gguf"), [(name, np.ones((rows, 8), np.float32))])
  with pytest.raises(safetensors_io.CorruptCheckpointError,
                     match=rf"m\.gguf: tensor '{name}' has shape \({rows}, 8\).*{match}"):
    gguf_io.read(path)


@pytest.mark.parametrize("name", ["blk.0", "blk.x.attn_norm.weight", "blk..attn_norm.weight"])
def test_gguf_malformed_block_tensor_names_are_refused(tmp_path, name):
  path = _gguf(str(tmp_path / "m.gguf"), [(name, np.ones(8, np.float32))])
  with pytest.raises(ValueError, match=rf"m\.gguf: unexpected tensor '{name}'"):
    gguf_io.read(path)


@pytest.mark.parametrize("key", ["attention.head_count", "attention.head_count_kv"])
def test_gguf_zero_heads_are_named(tmp_path, key):
  path = _gguf(str(tmp_path / "m.gguf"), keys={key: 0})
  reader = gguf_io._reader(path)  # pylint: disable=protected-access
  with pytest.raises(safetensors_io.CorruptCheckpointError, match=rf"llama\.{key}=0"):
    gguf_io.hf_config_from_metadata(reader, "m.gguf", False)


@pytest.mark.parametrize("key,value,want", [
    ("attention.key_length", "4", "an integer"),  # int("4") read it as 4.
    ("attention.key_length", 5.0, "an integer"),  # int(5.0) read it as 5.
    ("context_length", 64.5, "an integer"),  # Truncated to 64.
    ("attention.layer_norm_rms_epsilon", "abc", "a number"),  # Bare float() error.
    ("rope.freq_base", [1.0, 2.0], "a number"),
    ("rope.scaling.factor", "2", "a number"),  # Bare TypeError comparing str and float.
])
def test_gguf_metadata_of_the_wrong_type_is_named(tmp_path, key, value, want):
  path = _gguf(str(tmp_path / "m.gguf"), keys={key: value})
  reader = gguf_io._reader(path)  # pylint: disable=protected-access
  want = rf"m\.gguf: llama\.{key}=.* has the wrong type; llama\.cpp reads {want}"
  with pytest.raises(safetensors_io.CorruptCheckpointError, match=want):
    gguf_io.hf_config_from_metadata(reader, "m.gguf", False)


# --- safetensors ----------------------------------------------------------------------------


def test_safetensors_slice_of_an_empty_tensor_has_the_slice_shape(tmp_path):
  path = str(tmp_path / "a.safetensors")
  safetensors_io.write(path, {"e": np.zeros((0, 4), np.float32)})
  f = safetensors_io.SafetensorsFile(path)
  assert f.read("e", (slice(0, 0), slice(1, 3))).shape == (0, 2)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i4", ">f2", "<u2", "<u4", "<u8"])
def test_safetensors_round_trip_of_any_byte_order_and_unsigned_width(tmp_path, dtype):
  path = str(tmp_path / "a.safetensors")
  a = (np.arange(6) * 3 + 1).reshape(2, 3).astype(dtype)
  safetensors_io.write(path, {"w": a})
  got = safetensors_io.SafetensorsFile(path).read("w")
  assert got.dtype.kind == a.dtype.kind and got.dtype.itemsize == a.dtype.itemsize
  np.testing.assert_array_equal(got, a)


def test_safetensors_tensor_named_like_the_metadata_is_refused_on_write(tmp_path):
  # Written before, its entry was read back as metadata: an unreadable file.
  with pytest.raises(ValueError, match="__metadata__"):
    safetensors_io.write(str(tmp_path / "a.safetensors"), {"__metadata__": np.ones(2)})


def _raw_file(path, header: dict, data: bytes):
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("entry,match", [
    ({"shape": [1.5], "data_offsets": [0, 4]}, r"shape \[1\.5\]"),  # Read as (1,).
    ({"shape": [True], "data_offsets": [0, 4]}, r"shape \[True\]"),  # Read as (1,).
    ({"shape": "12", "data_offsets": [0, 8]}, r"shape '12'"),  # Read as (1, 2).
    ({"shape": [1], "data_offsets": [0.0, 4]}, r"data_offsets \[0\.0, 4\]"),
])
def test_safetensors_header_numbers_that_are_not_integers_are_corrupt(tmp_path, entry, match):
  path = str(tmp_path / "a.safetensors")
  _raw_file(path, {"w": {"dtype": "F32", **entry}}, bytes(entry["data_offsets"][1]))
  with pytest.raises(safetensors_io.CorruptCheckpointError, match=rf"a\.safetensors: .*{match}"):
    safetensors_io.SafetensorsFile(path)


@pytest.mark.parametrize("meta", [[1, 2], {"format": 1}])
def test_safetensors_metadata_that_is_not_a_map_of_strings_is_corrupt(tmp_path, meta):
  path = str(tmp_path / "a.safetensors")
  _raw_file(path, {"__metadata__": meta,
                   "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
  with pytest.raises(safetensors_io.CorruptCheckpointError, match=r"a\.safetensors: __metadata__"):
    safetensors_io.SafetensorsFile(path)


@pytest.mark.parametrize("index,match", [
    ({"weight_map": ["w"]}, r"weight_map \['w'\] is not"),  # AttributeError before.
    ({"weight_map": {"w": 3}}, r"'w' maps to 3"),  # TypeError in os.path.join.
    ([1], r"unreadable shard index"),  # TypeError.
    ({"weight_map": {"w": "../a.safetensors"}}, r"'w' maps to '\.\./a\.safetensors'"),
    ({"weight_map": {}}, r"weight_map \{\} is not"),  # "no *.safetensors files" before.
])
def test_malformed_shard_index_is_corrupt_and_named(tmp_path, index, match):
  folder = tmp_path / "ckpt"
  folder.mkdir()
  safetensors_io.write(str(folder / "model-00001-of-00001.safetensors"),
                       {"w": np.ones(2, np.float32)})
  safetensors_io.write(str(tmp_path / "a.safetensors"), {"w": np.zeros(2, np.float32)})
  (folder / safetensors_io.INDEX_FILENAME).write_text(json.dumps(index))
  with pytest.raises(safetensors_io.CorruptCheckpointError,
                     match=rf"model\.safetensors\.index\.json: .*{match}"):
    safetensors_io.Checkpoint(str(folder))


# --- config.json ----------------------------------------------------------------------------


def test_config_json_that_is_not_an_object_is_corrupt(tmp_path):
  (tmp_path / hf.CONFIG_FILENAME).write_text("[1, 2]")
  with pytest.raises(safetensors_io.CorruptCheckpointError, match=r"config\.json: a JSON list"):
    hf.read_overrides(str(tmp_path))


@pytest.mark.parametrize("fields,match", [
    ({"model_type": "llama", "num_attention_heads": 0}, r"num_attention_heads=0"),
    ({"model_type": "qwen2", "num_attention_heads": 0}, r"num_attention_heads=0"),
    ({"model_type": "qwen3_moe", "decoder_sparse_step": 0}, r"decoder_sparse_step=0"),
])
def test_config_json_zero_divisors_are_named(fields, match):
  with pytest.raises(architectures.UnsupportedArchitectureError, match=match):
    architectures.model_overrides({"hidden_size": 8, "num_hidden_layers": 1, **fields})

