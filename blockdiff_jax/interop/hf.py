"""Import from and export to Hugging Face model folders (config.json + safetensors).

    overrides = hf.read_overrides(folder)          # our config.model fields
    cfg = hf.transformer_config(overrides)         # or TransformerConfig.from_config(...)
    params = hf.load_params(folder, cfg)           # the tree Transformer(cfg).init gives
    hf.export(out_folder, params, cfg, tokenizer=tok)  # loads in transformers

Every check (architecture, tensor names, shapes, file integrity) runs before any data is
read, so a bad checkpoint raises before anything is half-loaded. With ``shardings`` each
device reads only the bytes of its own shard (``jax.make_array_from_callback``).
"""

import dataclasses
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.model import flops
from blockdiff_jax.model import lora as lora_lib
from blockdiff_jax.model import moe as moe_lib
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer

CONFIG_FILENAME = "config.json"


class CheckpointMismatchError(ValueError):
  """Tensor names or shapes of a checkpoint do not match the model."""


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {CONFIG_FILENAME} in {folder}")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except ValueError as e:
    raise safetensors_io.CorruptCheckpointError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(config, dict):  # Every reader of it calls .get on it.
    raise safetensors_io.CorruptCheckpointError(
        f"{path}: a JSON {type(config).__name__}, not an object of config keys")
  return config


def read_overrides(folder: str) -> dict[str, Any]:
  """Our ``config.model`` fields (dotted keys) for the model in ``folder``."""
  return architectures.model_overrides(read_hf_config(folder))


def transformer_config(overrides: dict[str, Any], **kwargs) -> transformer.TransformerConfig:
  """A TransformerConfig from ``model_overrides`` (kwargs: scan_layers, dtype, ...)."""
  o = {k: v for k, v in overrides.items() if not k.startswith("_")}
  moe_impl = kwargs.pop("moe_impl", "ragged_dot")
  moe_cfg = None
  if o.get("moe.num_experts"):
    moe_cfg = moe_lib.MoEConfig(
        num_experts=o["moe.num_experts"], top_k=o["moe.top_k"], expert_dim=o["moe.expert_dim"],
        shared_expert_dim=o.get("moe.shared_expert_dim", 0),
        shared_expert_gate=o.get("moe.shared_expert_gate", False), router_func=o["moe.router_func"],
        router_mode=o["moe.router_mode"], normalize_topk=o["moe.normalize_topk"],
        block_min_experts=o["moe.top_k"], impl=moe_impl)
  fields = {k: v for k, v in o.items() if "." not in k}
  scaling = {k.split(".", 1)[1]: v for k, v in o.items() if k.startswith("rope_scaling.")}
  if scaling:
    fields["rope_scaling"] = rope.RopeScaling(**scaling)
  fields.update(kwargs)
  return transformer.TransformerConfig(
      moe=moe_cfg, moe_every=o.get("moe.moe_every", 1),
      first_dense_layers=o.get("moe.first_dense_layers", 0), **fields)


def _expected_hf_shape(spec: architectures.ParamSpec, shape: tuple[int, ...]):
  inner = shape[spec.num_stacked:]
  return tuple(int(np.prod([inner[a] for a in g])) for g in spec.groups)


def check(ckpt: safetensors_io.Checkpoint, cfg: transformer.TransformerConfig,
          model_type: str = "") -> list[tuple[architectures.ParamSpec, tuple[int, ...]]]:
  """Matches every parameter to its tensors; raises on a missing/unexpected name or shape."""
  shapes = flax.traverse_util.flatten_dict(flops.param_shapes(cfg))
  specs = architectures.param_specs(cfg, model_type)
  by_path = {s.path: s for s in specs}
  if set(by_path) != set(shapes):  # A bug of ours, not of the checkpoint.
    raise AssertionError(f"spec/model mismatch: {set(by_path) ^ set(shapes)}")
  used = set()
  out = []
  for path, sds in shapes.items():
    spec = by_path[path]
    want = _expected_hf_shape(spec, sds.shape)
    for name in spec.names.reshape(-1):
      if not ckpt.has(name):
        raise CheckpointMismatchError(
            f"missing tensor {name!r} (for parameter {'/'.join(path)}) in {ckpt.folder}")
      got = ckpt.shape(name)
      if got != want:
        raise CheckpointMismatchError(
            f"tensor {name!r} has shape {got} but parameter {'/'.join(path)} needs {want} "
            f"(model shape {sds.shape})")
      used.add(ckpt.real_name(name))
    out.append((spec, sds.shape))
  # Tied heads: checkpoints may still carry a copy of the embedding as lm_head.weight.
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in ckpt.names - used - ignorable
                      if not n.endswith("rotary_emb.inv_freq"))
  if unexpected:
    raise CheckpointMismatchError(
        f"unexpected tensor {unexpected[0]!r} in {ckpt.folder} ({len(unexpected)} unused in all"
        f"{': ' + ', '.join(unexpected[:5]) if len(unexpected) > 1 else ''})")
  return out


def _norm_index(index, shape):
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def read_block(ckpt: safetensors_io.Checkpoint, spec: architectures.ParamSpec,
               shape: tuple[int, ...], index: tuple[slice, ...] | None = None) -> np.ndarray:
  """Our parameter's block ``index`` (basic slices), reading only the bytes it needs."""
  index = _norm_index(index or (slice(None),) * len(shape), shape)
  k = spec.num_stacked
  inner_shape, inner_idx = shape[k:], index[k:]
  names = spec.names[index[:k]] if k else spec.names
  block = np.empty(tuple(s.stop - s.start for s in index), np.float32)
  for pos in np.ndindex(names.shape):
    hf_index, sizes, order = [], [], []
    for g in spec.groups:
      major = inner_idx[g[0]]
      minor = int(np.prod([inner_shape[a] for a in g[1:]]))
      hf_index.append(slice(major.start * minor, major.stop * minor))
      sizes += [major.stop - major.start] + [inner_shape[a] for a in g[1:]]
      order += list(g)
    a = ckpt.read(names[pos], tuple(hf_index)).reshape(sizes)
    a = a.transpose(np.argsort(order))
    minor_idx = tuple(slice(None) if any(g[0] == ax for g in spec.groups) else inner_idx[ax]
                      for ax in range(len(inner_shape)))
    block[pos] = a[minor_idx]
  return block


def load_params(folder: str, cfg: transformer.TransformerConfig, shardings: Any = None,
                model_type: str = "") -> dict:
  """Parameters of ``Transformer(cfg)`` from an HF folder (fp32).

  Args:
    folder: HF model folder.
    cfg: our static config (``transformer_config(read_overrides(folder))``; scanned
      layers are stacked on import).
    shardings: optional pytree of ``jax.sharding.Sharding`` matching the params; then
      each device's shard is read on its own.
    model_type: HF model_type (default: from config.json).

  Raises:
    CheckpointMismatchError, CorruptCheckpointError: before anything is loaded.
  """
  ckpt = safetensors_io.Checkpoint(folder)
  model_type = model_type or read_hf_config(folder).get("model_type", "")
  plan = check(ckpt, cfg, model_type)
  flat_shardings = None
  if shardings is not None:
    flat_shardings = flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings))
  flat = {}
  for spec, shape in plan:
    if flat_shardings is None:
      flat[spec.path] = jnp.asarray(read_block(ckpt, spec, shape))
    else:
      flat[spec.path] = jax.make_array_from_callback(
          shape, flat_shardings[spec.path],
          lambda idx, spec=spec, shape=shape: read_block(ckpt, spec, shape, idx))
  return flax.traverse_util.unflatten_dict(flat)


def hf_tensors(params: dict, cfg: transformer.TransformerConfig, model_type: str = "",
               dtype=np.float32) -> dict[str, np.ndarray]:
  """Our params as HF-named tensors (the inverse of ``load_params``)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  out = {}
  for spec in architectures.param_specs(cfg, model_type):
    value = np.asarray(jax.device_get(flat[spec.path]), np.float32)
    k = spec.num_stacked
    for pos in np.ndindex(spec.names.shape):
      a = value[pos] if k else value
      order = [ax for g in spec.groups for ax in g]
      hf_shape = _expected_hf_shape(spec, value.shape)
      out[spec.names[pos]] = a.transpose(order).reshape(hf_shape).astype(dtype)
  return out


def export(folder: str, params: dict, cfg: transformer.TransformerConfig,
           overrides: dict[str, Any] | None = None, tokenizer=None, extra_config: dict | None = None,
           max_shard_bytes: int = 0) -> None:
  """Writes an HF folder that ``transformers.AutoModelForCausalLM`` loads.

  Plain LoRA adapters are folded into the base weights (``lora.merge_adapters``).

  Args:
    folder: output folder (created).
    params: our params (unboxed).
    cfg: their TransformerConfig.
    overrides: the model_overrides the params were imported with (their model_type,
      where cfg still fits it, and context length are kept); config.json is cfg's.
    tokenizer: optional ``interop.tokenizer.PretrainedTokenizer``; its files are saved too
      and its special ids (bos/eos/pad/mask) go into config.json.
    extra_config: more config.json keys.
    max_shard_bytes: shard the weights above this size (with an index); 0 = one file.

  Raises:
    UnsupportedArchitectureError: cfg computes something config.json cannot express
      (static "ntk" RoPE scaling, a non-token router, gated LoRA adapters), also
      when ``overrides`` are given: they describe the imported model, not what cfg
      changed since (cfg's RoPE is what config.json gets).
  """
  if cfg.lora is not None:
    if cfg.lora.gated:
      raise architectures.UnsupportedArchitectureError(
          "gated LoRA adapters (model.lora.gated=True) act only on MASK tokens and have no "
          "Hugging Face equivalent; export a model trained with plain adapters (gated=False)")
    params = lora_lib.merge_adapters(params, cfg.lora)
    cfg = dataclasses.replace(cfg, lora=None)
  derived = config_overrides(cfg)  # Raises for what config.json cannot express.
  imported = dict(overrides or {})
  # cfg is the architecture (its RoPE, experts, tied head): the import's fields described
  # the weights before an upcycle or a re-tie, and config.json got those while the
  # tensors were cfg's (transformers loaded random MLPs, or tied a trained head away).
  # The import only names the model_type, where cfg still fits it, and the context length.
  overrides = dict(derived)
  if imported.get("_model_type"):
    try:
      architectures.hf_config({**derived, "_model_type": imported["_model_type"]})
      overrides["_model_type"] = imported["_model_type"]
    except architectures.UnsupportedArchitectureError:
      pass  # Inferred from cfg (raises below when no model_type fits).
  overrides["_max_position_embeddings"] = context_length(imported, derived)
  extra = dict(extra_config or {})
  if tokenizer is not None:
    extra.update(tokenizer.hf_config_ids())
  hf = architectures.hf_config(overrides, extra)
  tensors = hf_tensors(params, cfg, hf["model_type"])
  os.makedirs(folder, exist_ok=True)
  safetensors_io.write_folder(folder, tensors, max_shard_bytes)
  with open(os.path.join(folder, CONFIG_FILENAME), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    # transformers warns past (and truncation=True cuts at) the tokenizer's own length.
    tokenizer.save_pretrained(folder, hf["max_position_embeddings"])


def context_length(imported: dict[str, Any], derived: dict[str, Any]) -> int:
  """config.json's max_position_embeddings for an export.

  The imported model's own while the RoPE is the one it was imported with; for YaRN set
  here, original x factor (transformers reads max_position_embeddings / original as
  YaRN's implicit factor and warns when it differs from the explicit one); else the
  imported value, or 8192 (unknown) for a model trained here.

  Args:
    imported: the model_overrides of the import (empty for a model trained here).
    derived: ``config_overrides`` of the exported config.
  """
  rope_fields = lambda o: {k: v for k, v in o.items() if k.startswith("rope_")}
  length = imported.get("_max_position_embeddings")
  if length and rope_fields(imported) == rope_fields(derived):
    return int(length)
  if derived["rope_scaling.type"] == "yarn":
    return int(round(derived["rope_scaling.original_max_position"] *
                     derived["rope_scaling.factor"]))
  return int(length or 8192)


def config_overrides(cfg: transformer.TransformerConfig) -> dict[str, Any]:
  """model_overrides of a TransformerConfig (for export of a model not imported)."""
  o = {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "num_layers", "num_heads",
                                    "num_kv_heads", "head_dim", "mlp_dim", "qkv_bias",
                                    "qk_norm", "tie_embeddings", "rope_theta", "norm_eps")}
  o["moe.num_experts"] = cfg.moe.num_experts if cfg.moe else 0
  if cfg.moe:
    o.update({"moe.top_k": cfg.moe.top_k, "moe.expert_dim": cfg.moe.expert_dim,
              "moe.shared_expert_dim": cfg.moe.shared_expert_dim,
              "moe.shared_expert_gate": cfg.moe.shared_expert_gate,
              "moe.normalize_topk": cfg.moe.normalize_topk, "moe.moe_every": cfg.moe_every,
              "moe.first_dense_layers": cfg.first_dense_layers})
    if cfg.moe.router_func != "softmax" or cfg.moe.router_mode != "token":
      raise architectures.UnsupportedArchitectureError(
          f"router {cfg.moe.router_func}/{cfg.moe.router_mode} has no HF equivalent "
          "(qwen3_moe/qwen2_moe: softmax/token)")
  rs = cfg.rope_scaling
  o["rope_scaling.type"] = rs.type
  o.update({f"rope_scaling.{name}": getattr(rs, name) for name in rope.FIELDS_BY_TYPE[rs.type]})
  architectures.rope_config(o)  # Raises for a scaling config.json cannot express.
  return o
