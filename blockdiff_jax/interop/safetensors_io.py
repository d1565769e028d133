"""Safetensors files read lazily (memory-mapped slices) and written, without torch.

The format: 8 bytes little-endian header length N, N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the end of the
header), then the raw little-endian data. Reading through ``np.memmap`` touches only the
pages of the slice asked for, so a device that reads its own shard of a sharded parameter
reads only those bytes; bfloat16 comes through ``ml_dtypes`` (numpy has none).
"""

import json
import os
import re
import struct
from typing import Any, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILENAME = "model.safetensors"
INDEX_FILENAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CorruptCheckpointError(ValueError):
  """A checkpoint file is unreadable, truncated or inconsistent; names the file."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """json object hook: a name listed twice would otherwise keep only its last entry."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"{key!r} is listed twice")
    out[key] = value
  return out


def _ints(value, what: str, length: int | None = None) -> tuple[int, ...]:
  """A header's list of integers, checked as the reference reader checks it.

  ``int()`` alone would take a shape of ``[1.5]`` as ``(1,)``, ``[true]`` as ``(1,)`` and
  the string ``"12"`` as ``(1, 2)``, reading a header the reference refuses.
  """
  if not isinstance(value, list) or any(
      isinstance(v, bool) or not isinstance(v, int) for v in value):
    raise ValueError(f"{what} {value!r} is not a list of integers")
  if length is not None and len(value) != length:
    raise ValueError(f"{what} {value!r} does not have {length} entries")
  return tuple(value)


class SafetensorsFile:
  """One ``.safetensors`` file: header validated on open, tensors read as memmap slices."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise CorruptCheckpointError(f"{path}: file too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
          raise CorruptCheckpointError(
              f"{path}: header length {n} exceeds the file ({size} bytes); truncated or "
              "not a safetensors file")
        header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
    except CorruptCheckpointError:
      raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise CorruptCheckpointError(f"{path}: cannot read the safetensors header: {e}") from e
    if not isinstance(header, dict):
      raise CorruptCheckpointError(
          f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    self.metadata = header.pop("__metadata__", None) or {}
    if not isinstance(self.metadata, dict) or not all(
        isinstance(v, str) for v in self.metadata.values()):
      # The reference reader demands a map of strings.
      raise CorruptCheckpointError(
          f"{path}: __metadata__ {self.metadata!r} is not a JSON object of strings")
    self._data_start = 8 + n
    self.tensors = {}
    for name, info in header.items():
      if isinstance(info, dict) and isinstance(info.get("dtype"), str) and (
          info["dtype"] not in DTYPES):
        # A valid file of another dtype (FP8 ...), not a corrupt one.
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not "
                         f"supported (only {', '.join(DTYPES)})")
      try:
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = _ints(info["shape"], "shape")
        begin, end = _ints(info["data_offsets"], "data_offsets", 2)
      except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: bad header entry for tensor {name!r}: {e}") from e
      if min(shape, default=0) < 0 or begin < 0 or (
          end - begin != dtype.itemsize * int(np.prod(shape))):
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes) "
            f"for shape {shape} {dtype}")
      if self._data_start + end > size:
        raise CorruptCheckpointError(
            f"{path}: truncated: tensor {name!r} ends at byte {self._data_start + end} "
            f"but the file has {size}")
      self.tensors[name] = (dtype, shape, begin)
    self._check_layout(size)

  def _check_layout(self, size: int) -> None:
    """Tensors must tile the data exactly, as the reference reader demands.

    Overlapping ranges would silently read one tensor's bytes as another's; a gap or
    bytes past the last tensor mean a header that does not describe its file.
    """
    spans = sorted((begin, begin + dtype.itemsize * int(np.prod(shape)), name)
                   for name, (dtype, shape, begin) in self.tensors.items())
    pos = 0
    for begin, end, name in spans:
      if begin != pos:
        raise CorruptCheckpointError(
            f"{self.path}: tensor {name!r} starts at data offset {begin} but the tensors "
            f"before it end at {pos} ({'overlapping' if begin < pos else 'a gap'}); "
            "corrupt header")
      pos = end
    if self._data_start + pos != size:
      raise CorruptCheckpointError(
          f"{self.path}: the tensors end at byte {self._data_start + pos} but the file has "
          f"{size}; corrupt header or trailing data")

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name][1]

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor, or a basic-slice view of it copied out (only its pages are read)."""
    dtype, shape, begin = self.tensors[name]
    if 0 in shape:  # No bytes to map; the slice still decides the shape.
      empty = np.zeros(shape, dtype)
      return empty if index is None else np.array(empty[index])
    if not shape:
      return np.fromfile(self.path, dtype, 1, offset=self._data_start + begin).reshape(())
    mm = np.memmap(self.path, dtype, "r", offset=self._data_start + begin, shape=shape)
    return np.array(mm if index is None else mm[index])


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  """Writes a safetensors file (atomically: a temporary file renamed into place)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    # Not ascontiguousarray: it makes a 0-d tensor 1-d (saved as shape [1]).
    a = np.require(np.asarray(tensors[name]), requirements="C")
    if name == "__metadata__":  # Its entry would be read back as the metadata.
      raise ValueError("a tensor cannot be named '__metadata__' (the header's metadata key)")
    if not a.dtype.isnative:  # Big-endian data: the format stores little-endian bytes.
      a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Aligned data start, as the reference writer does.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


class Checkpoint:
  """All tensors of an HF model folder (one file, several, or sharded with an index).

  Files are chosen as transformers chooses them: ``model.safetensors`` if there is one,
  else the shards the index names (each tensor from its named shard), else every
  ``*.safetensors`` file, where a tensor in two files is refused as ambiguous.

  Also answers per-expert names (``mlp.experts.{j}.gate_proj.weight``) from the fused
  expert tensors that transformers >= 5 may write (``mlp.experts.gate_up_proj`` [E, 2F, D],
  ``mlp.experts.down_proj`` [E, D, F]).
  """

  def __init__(self, folder: str):
    self.folder = folder
    index_path = os.path.join(folder, INDEX_FILENAME)
    # transformers' order: model.safetensors wins over an index next to it (a leftover of
    # an earlier sharded save), so both read the same weights.
    if os.path.isfile(os.path.join(folder, SINGLE_FILENAME)):
      files, weight_map = [SINGLE_FILENAME], None
    elif os.path.isfile(index_path):
      weight_map = _read_weight_map(index_path)
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
      weight_map = None
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {folder}")
    self.files = {}
    for fname in files:
      path = os.path.join(folder, fname)
      if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{index_path}: shard {fname} is missing")
      self.files[fname] = SafetensorsFile(path)
    self._where = {}
    if weight_map is not None:  # Each tensor from the shard the index names.
      for name, fname in weight_map.items():
        if name not in self.files[fname].tensors:
          raise CorruptCheckpointError(f"{index_path}: tensor {name!r} is not in {fname}")
        self._where[name] = self.files[fname]
    for fname, sf in self.files.items():
      for name in sf.tensors:
        other = self._where.setdefault(name, sf)
        if weight_map is None and other is not sf:
          # Which copy is meant is unknowable (a stale file next to a newer export?).
          raise CorruptCheckpointError(
              f"{folder}: tensor {name!r} is in both {os.path.basename(other.path)} and "
              f"{fname}; remove the stale file or add a {INDEX_FILENAME}")

  @property
  def names(self) -> set[str]:
    return set(self._where)

  def _resolve(self, name: str):
    """(real name, leading index, (axis-0 offset, length) or None) of a name."""
    if name in self._where:
      return name, (), None
    parts = name.split(".")
    if len(parts) > 4 and parts[-4] == "experts" and parts[-3].isdigit():
      base = ".".join(parts[:-3])
      j, proj = int(parts[-3]), parts[-2]
      if proj in ("gate_proj", "up_proj") and base + ".gate_up_proj" in self._where:
        real = base + ".gate_up_proj"
        f = self._where[real].shape(real)[1] // 2
        return real, (j,), (0 if proj == "gate_proj" else f, f)
      if proj == "down_proj" and base + ".down_proj" in self._where:
        return base + ".down_proj", (j,), None
    raise KeyError(name)

  def has(self, name: str) -> bool:
    try:
      self._resolve(name)
      return True
    except KeyError:
      return False

  def real_name(self, name: str) -> str:
    """The stored tensor holding ``name`` (itself, or a fused expert tensor)."""
    return self._resolve(name)[0]

  def shape(self, name: str) -> tuple[int, ...]:
    real, lead, part = self._resolve(name)
    shape = self._where[real].shape(real)[len(lead):]
    if part is not None:
      shape = (part[1],) + shape[1:]
    return shape

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Basic slices of a (possibly virtual) tensor."""
    real, lead, part = self._resolve(name)
    if part is not None:
      s0 = index[0]
      index = (slice(part[0] + s0.start, part[0] + s0.stop),) + tuple(index[1:])
    try:
      return self._where[real].read(real, tuple(lead) + tuple(index))
    except (OSError, ValueError) as e:
      raise CorruptCheckpointError(f"{self._where[real].path}: cannot read {real!r}: {e}") from e


def _read_weight_map(index_path: str) -> dict[str, str]:
  """The ``weight_map`` of a shard index: tensor name -> shard file in the same folder.

  Raises:
    CorruptCheckpointError: naming the index when it is unreadable, names no tensor, or
      maps a name to anything but a plain file name (a list, a number, ``../x``).
  """
  try:
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(f"{index_path}: unreadable shard index: {e!r}") from e
  if not isinstance(weight_map, dict) or not weight_map:
    raise CorruptCheckpointError(
        f"{index_path}: weight_map {str(weight_map)[:80]} is not a non-empty object of "
        "tensor name -> shard file")
  for name, fname in weight_map.items():
    if not isinstance(fname, str) or not fname or os.path.basename(fname) != fname or (
        fname in (".", "..")):
      raise CorruptCheckpointError(
          f"{index_path}: tensor {name!r} maps to {fname!r}, not a file name in the folder")
  return weight_map


def write_folder(folder: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 0,
                 metadata: Iterable[tuple[str, Any]] = ()) -> list[str]:
  """Writes ``model.safetensors`` (or shards plus an index when over max_shard_bytes).

  The weight files of an earlier save into ``folder`` that this one does not replace
  (``model.safetensors``, the index, ``model-*-of-*`` shards) are removed: a loader
  would otherwise read the old weights (transformers prefers a stale model.safetensors
  to a new index; an index left next to a new model.safetensors names the old shards).
  """
  os.makedirs(folder, exist_ok=True)
  meta = dict(metadata) or {"format": "pt"}
  total = sum(np.asarray(a).nbytes for a in tensors.values())
  if not max_shard_bytes or total <= max_shard_bytes:
    write(os.path.join(folder, SINGLE_FILENAME), tensors, meta)
    _remove_stale(folder, [SINGLE_FILENAME])
    return [SINGLE_FILENAME]
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  weight_map, files = {}, []
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write(os.path.join(folder, fname), shard, meta)
    files.append(fname)
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(folder, INDEX_FILENAME), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  _remove_stale(folder, files + [INDEX_FILENAME])
  return files


def _remove_stale(folder: str, keep: list[str]) -> None:
  """Removes the weight files of an earlier save that are not in ``keep``."""
  for fname in os.listdir(folder):
    stale = fname in (SINGLE_FILENAME, INDEX_FILENAME) or _SHARD_PATTERN.fullmatch(fname)
    if stale and fname not in keep and os.path.isfile(os.path.join(folder, fname)):
      os.remove(os.path.join(folder, fname))
