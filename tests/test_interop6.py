"""Checkpoint readers against their references: safetensors headers as the ``safetensors``
package judges them, folders re-exported in place, and GGUF tensor types / per-layer keys
as llama.cpp's format (written with the ``gguf`` package) defines them."""

import json
import os
import struct

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors import numpy as safetensors_numpy

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import safetensors_io

_F32 = np.arange(4, dtype=np.float32).tobytes()


def _raw_file(path, header_json: bytes, data: bytes):
  """A safetensors file with exactly this header text (what a broken writer leaves)."""
  header_json += b" " * (-len(header_json) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header_json)) + header_json + data)


def _entry(name, shape, begin, end):
  return {name: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}}


_BAD_HEADERS = {
    # b's bytes are a's second half: read silently as two tensors sharing memory.
    "overlap": json.dumps({**_entry("a", [2], 0, 8), **_entry("b", [2], 4, 12)}).encode(),
    "gap": json.dumps({**_entry("a", [1], 0, 4), **_entry("b", [1], 8, 12)}).encode(),
    "trailing": json.dumps(_entry("a", [1], 0, 4)).encode(),
    # json keeps only the last of two entries of one name.
    "twice": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
             b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
    "negative": json.dumps(_entry("a", [-1], 4, 0)).encode(),
    "list": b"[1, 2]",
}


@pytest.mark.parametrize("kind", sorted(_BAD_HEADERS))
def test_safetensors_header_the_reference_refuses_is_corrupt(tmp_path, kind):
  path = str(tmp_path / "bad.safetensors")
  data = {"gap": _F32[:12], "trailing": _F32, "twice": _F32[:8]}.get(kind, _F32[:12])
  _raw_file(path, _BAD_HEADERS[kind], data)
  with pytest.raises(Exception):  # The reference reader: not a valid file.
    with safe_open(path, "np") as f:
      [f.get_tensor(k) for k in f.keys()]  # pylint: disable=expression-not-assigned
  with pytest.raises(safetensors_io.CorruptCheckpointError, match="bad.safetensors"):
    safetensors_io.SafetensorsFile(path)


def test_reference_written_dtypes_and_metadata_read_back(tmp_path):
  path = str(tmp_path / "ok.safetensors")
  tensors = {"bool": np.array([True, False, True]), "f16": np.array([1.5, -2.0], np.float16),
             "i64": np.array([[2**40], [-3]], np.int64), "empty": np.zeros((0, 3), np.float32),
             "scalar": np.array(7.0, np.float32)}
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
  sf = safetensors_io.SafetensorsFile(path)
  assert sf.metadata == {"format": "pt"}
  for name, want in tensors.items():
    got = sf.read(name)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want)


def _tensors(value):
  return {f"t{i}": np.full(100, value, np.float32) for i in range(4)}


@pytest.mark.parametrize("first_shard,then_shard", [(500, 0), (0, 500), (200, 1000)])
def test_export_into_an_earlier_export_reads_only_the_new_weights(tmp_path, first_shard,
                                                                  then_shard):
  folder = str(tmp_path / "out")
  safetensors_io.write_folder(folder, _tensors(0.0), max_shard_bytes=first_shard)
  files = safetensors_io.write_folder(folder, _tensors(1.0), max_shard_bytes=then_shard)
  # Nothing else a loader could pick up: transformers prefers model.safetensors to an
  # index, so a stale one would shadow new shards.
  expected = set(files) | ({safetensors_io.INDEX_FILENAME} if len(files) > 1 else set())
  assert set(os.listdir(folder)) == expected
  ckpt = safetensors_io.Checkpoint(folder)
  for name in _tensors(0.0):
    np.testing.assert_array_equal(ckpt.read(name, (slice(0, 100),)), np.ones(100, np.float32))


def test_model_safetensors_wins_over_a_stale_index_as_in_transformers(tmp_path):
  folder = str(tmp_path / "out")
  safetensors_io.write_folder(folder, _tensors(0.0), max_shard_bytes=500)
  kept = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
  safetensors_io.write_folder(folder, _tensors(1.0))
  for f, blob in kept.items():  # An older tool's save: the sharded files left in place.
    with open(os.path.join(folder, f), "wb") as fh:
      fh.write(blob)
  ckpt = safetensors_io.Checkpoint(folder)
  np.testing.assert_array_equal(ckpt.read("t0", (slice(0, 2),)), [1.0, 1.0])


def test_tensor_in_two_files_without_index_is_refused(tmp_path):
  safetensors_numpy.save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"))
  safetensors_numpy.save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
  with pytest.raises(safetensors_io.CorruptCheckpointError,
                     match=r"'w' is in both a\.safetensors and b\.safetensors"):
    safetensors_io.Checkpoint(str(tmp_path))


def test_index_decides_which_shard_a_duplicated_tensor_comes_from(tmp_path):
  safetensors_numpy.save_file({"w": np.full(2, 5.0, np.float32)},
                              str(tmp_path / "model-00001-of-00002.safetensors"))
  safetensors_numpy.save_file({"w": np.zeros(2, np.float32), "v": np.ones(1, np.float32)},
                              str(tmp_path / "model-00002-of-00002.safetensors"))
  with open(tmp_path / safetensors_io.INDEX_FILENAME, "w", encoding="utf-8") as f:
    json.dump({"weight_map": {"w": "model-00001-of-00002.safetensors",
                              "v": "model-00002-of-00002.safetensors"}}, f)
  ckpt = safetensors_io.Checkpoint(str(tmp_path))
  np.testing.assert_array_equal(ckpt.read("w", (slice(0, 2),)), [5.0, 5.0])


# --- GGUF ---------------------------------------------------------------------------------


def _gguf(path, tensors=(), keys=None):
  """A llama GGUF (2 layers, d=8) with these tensors and metadata keys overridden."""
  w = gguf.GGUFWriter(path, "llama")
  base = {"block_count": 2, "context_length": 64, "embedding_length": 8,
          "feed_forward_length": 16, "attention.head_count": 2, "attention.head_count_kv": 1,
          "vocab_size": 32}
  for key, value in {**base, **(keys or {})}.items():
    if isinstance(value, list):
      w.add_array(f"llama.{key}", value)
    elif value is not None:
      w.add_uint32(f"llama.{key}", value)
  for name, a in tensors:
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_f64_tensor_reads_as_its_values(tmp_path):
  emb = np.random.default_rng(0).normal(size=(32, 8))  # float64: GGML type F64.
  _, tensors = gguf_io.read(_gguf(str(tmp_path / "m.gguf"), [("token_embd.weight", emb)]))
  np.testing.assert_allclose(tensors["model.embed_tokens.weight"], emb, rtol=1e-7, atol=0)


def test_gguf_tensor_type_without_dequantizer_is_named_not_called_corrupt(tmp_path):
  path = _gguf(str(tmp_path / "m.gguf"), [("token_embd.weight", np.ones((32, 8), np.int32))])
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"'token_embd.weight' has GGML type I32") as e:
    gguf_io.read(path)
  assert not isinstance(e.value, safetensors_io.CorruptCheckpointError)


@pytest.mark.parametrize("keys,want", [
    ({"attention.head_count": [2, 2], "attention.head_count_kv": [1, 1],
      "feed_forward_length": [16, 16]}, (2, 1, 16)),
    ({"attention.head_count_kv": None}, (2, 2, 16)),  # Absent: one KV head per head.
])
def test_gguf_head_counts_read_as_llama_cpp_reads_them(tmp_path, keys, want):
  reader = gguf_io._reader(_gguf(str(tmp_path / "m.gguf"), keys=keys))  # pylint: disable=protected-access
  hf = gguf_io.hf_config_from_metadata(reader, "m.gguf", False)
  assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"]) == want


@pytest.mark.parametrize("keys,error,match", [
    ({"attention.head_count_kv": [1, 2]}, architectures.UnsupportedArchitectureError,
     r"llama\.attention\.head_count_kv=\[1, 2\]: a different value per layer"),
    ({"attention.head_count": None}, safetensors_io.CorruptCheckpointError,
     r"llama\.attention\.head_count is missing"),
    ({"block_count": None}, safetensors_io.CorruptCheckpointError,
     r"llama\.block_count is missing"),
])
def test_gguf_bad_head_count_keys_are_named(tmp_path, keys, error, match):
  reader = gguf_io._reader(_gguf(str(tmp_path / "m.gguf"), keys=keys))  # pylint: disable=protected-access
  with pytest.raises(error, match=match):
    gguf_io.hf_config_from_metadata(reader, "m.gguf", False)
