"""Hugging Face ``config.json`` <-> our ``config.model`` fields, and the tensor-name layout.

Supported architectures (``model_type``): ``llama`` (SmolLM2), ``qwen2`` (Qwen2/2.5: QKV
bias), ``qwen3`` (QK-norm), ``qwen3_moe`` (experts, softmax router, ``norm_topk_prob``) and
``qwen2_moe`` (Qwen1.5/2-MoE: QKV bias, plus a shared expert scaled by a sigmoid gate).
Every parameter of ours comes from named HF tensors through a ``ParamSpec``: the HF tensor
(or an array of them, stacked on our leading axes for scanned layers and per-expert
tensors), and which of our axes each HF axis holds. The importer (``safetensors_io``) and
the exporter both read the same specs, so import and export cannot drift apart.
"""

import dataclasses
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")


class UnsupportedArchitectureError(ValueError):
  """The checkpoint's architecture or one of its options has no equivalent here."""


def _rope_parameters(hf: dict) -> dict:
  """The RoPE parameters as transformers resolves them.

  transformers >= 5 writes rope_parameters; files from before write rope_theta and
  rope_scaling, which transformers >= 5 still lets win over rope_parameters. A top-level
  ``original_max_position_embeddings`` (Phi-3 style) wins over the one inside them for the
  types that read it, as in transformers' ``standardize_rope_params``.

  Raises:
    UnsupportedArchitectureError: for RoPE parameters nested by layer type, or a
      ``partial_rotary_factor`` other than 1.
  """
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  params = dict(hf.get(key) or {})
  nested = sorted(k for k, v in params.items() if isinstance(v, dict))
  if nested:
    # transformers' llama/qwen code reads one flat dict (it fails on these).
    raise UnsupportedArchitectureError(
        f"{key} nested by layer type ({', '.join(nested)}) is not supported; only one set "
        "of RoPE parameters for every layer")
  params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  params.setdefault("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial is not None and float(partial) != 1.0:
    # Made for another model: transformers' llama/qwen code ignores it with the default
    # RoPE (rotating whole heads) and fails with a scaled one.
    raise UnsupportedArchitectureError(
        f"partial_rotary_factor={partial} (RoPE on only part of each head) is not supported; "
        "only 1.0 (every dimension rotated)")
  if params["rope_type"] in ("llama3", "yarn") and hf.get("original_max_position_embeddings"):
    params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
  return params


IMPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def rope_overrides(hf: dict) -> dict[str, Any]:
  """``rope_theta`` and ``rope_scaling.*`` overrides of a config.json.

  rope types "default", "linear", "yarn" (every field of transformers', with its
  defaults) and "llama3".

  Raises:
    UnsupportedArchitectureError: for another rope_type ("dynamic" included: it rescales
      with each sequence's length), or a type without its fields.
  """
  params = _rope_parameters(hf)
  rope_type = params["rope_type"]
  o = {"rope_theta": float(params["rope_theta"]), "rope_scaling.type": "none"}
  if rope_type in ("default", None):
    return o
  if rope_type == "dynamic":
    raise UnsupportedArchitectureError(
        "rope type 'dynamic' is not supported for import: transformers' dynamic NTK leaves "
        "the base unscaled up to max_position_embeddings and grows it with each sequence's "
        "length, which no static scaling reproduces; rope_scaling.type='ntk' (base * "
        "factor^(d/(d-2)) at every length) is the static alternative")
  if rope_type not in IMPORTED_ROPE_TYPES:
    raise UnsupportedArchitectureError(
        f"rope type {rope_type!r} is not supported for import (only "
        f"{', '.join(map(repr, IMPORTED_ROPE_TYPES))})")
  factor = params.get("factor")
  # transformers falls back to max_position_embeddings when the original length is absent.
  original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
  if rope_type == "yarn" and factor is None and original:
    factor = hf.get("max_position_embeddings", original) / original  # As transformers does.
  required = {"linear": ("factor",), "yarn": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
  missing = [k for k in required if (factor if k == "factor" else params.get(k)) is None]
  if missing:
    raise UnsupportedArchitectureError(f"rope type {rope_type!r} without {', '.join(missing)}")
  o.update({"rope_scaling.type": rope_type, "rope_scaling.factor": float(factor)})
  if rope_type == "linear":
    return o
  if not original:
    raise UnsupportedArchitectureError(
        f"rope type {rope_type!r} needs original_max_position_embeddings or "
        "max_position_embeddings")
  o["rope_scaling.original_max_position"] = int(original)
  if rope_type == "llama3":
    o.update({"rope_scaling.low_freq_factor": float(params["low_freq_factor"]),
              "rope_scaling.high_freq_factor": float(params["high_freq_factor"])})
    return o
  optional = lambda k: None if params.get(k) is None else float(params[k])
  o.update({
      # transformers reads 0 (or null) as the default here.
      "rope_scaling.beta_fast": float(params.get("beta_fast") or 32.0),
      "rope_scaling.beta_slow": float(params.get("beta_slow") or 1.0),
      "rope_scaling.truncate": bool(params.get("truncate", True)),
      # Written even when None, so an earlier config.model value cannot survive import.
      "rope_scaling.attention_factor": optional("attention_factor"),
      "rope_scaling.mscale": optional("mscale"),
      "rope_scaling.mscale_all_dim": optional("mscale_all_dim"),
  })
  return o


def rope_config(overrides: dict[str, Any]) -> dict:
  """config.json's rope keys for ``rope_overrides`` (the inverse of it).

  Raises:
    UnsupportedArchitectureError: for "ntk" (Hugging Face has no static NTK type).
  """
  theta = overrides["rope_theta"]
  scaling_type = overrides.get("rope_scaling.type", "none")
  if scaling_type == "none":
    return {"rope_theta": theta, "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}
  if scaling_type == "ntk":
    raise UnsupportedArchitectureError(
        "rope_scaling.type='ntk' has no Hugging Face equivalent: transformers has no static "
        "NTK scaling, and its 'dynamic' type changes the base with each sequence's length; "
        "export a model with rope_scaling.type 'none', 'linear', 'yarn' or 'llama3'")
  if scaling_type not in ("linear", "yarn", "llama3"):
    raise UnsupportedArchitectureError(
        f"rope_scaling.type={scaling_type!r} export is not supported (only 'none', "
        "'linear', 'yarn', 'llama3')")
  get = lambda name, default=None: overrides.get(f"rope_scaling.{name}", default)
  scaling = {"rope_type": scaling_type, "factor": overrides["rope_scaling.factor"]}
  if scaling_type == "llama3":
    scaling.update({"low_freq_factor": get("low_freq_factor"),
                    "high_freq_factor": get("high_freq_factor"),
                    "original_max_position_embeddings": get("original_max_position")})
  if scaling_type == "yarn":
    scaling.update({"original_max_position_embeddings": get("original_max_position"),
                    "beta_fast": get("beta_fast", 32.0), "beta_slow": get("beta_slow", 1.0)})
    if not get("truncate", True):
      scaling["truncate"] = False  # Only written when off: older transformers lack the key.
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
      if get(name) is not None:
        scaling[name] = float(get(name))
  # rope_scaling for transformers < 5; >= 5 reads either.
  return {"rope_theta": theta, "rope_scaling": scaling,
          "rope_parameters": {"rope_theta": theta, **scaling}}


def _check_full_attention(hf: dict, model_type: str) -> None:
  """Refuses a config.json on which transformers slides a window over some layer.

  The layer types are resolved as transformers' config classes do: an explicit
  ``layer_types`` wins; else, with ``use_sliding_window``, Qwen2/Qwen3 slide the layers
  from ``max_window_layers`` on, Qwen2-MoE the even-numbered ones below it, and
  Qwen3-MoE every layer. So ``use_sliding_window=True`` that slides no layer imports.

  Raises:
    UnsupportedArchitectureError: naming the fields that make a layer slide.
  """
  n = hf["num_hidden_layers"]
  window = hf.get("sliding_window")
  if hf.get("layer_types") is not None:
    sliding = [i for i, t in enumerate(hf["layer_types"]) if t != "full_attention"]
    why = f"layer_types={hf['layer_types']}"
  elif not hf.get("use_sliding_window"):
    return
  elif model_type == "llama":  # transformers' llama has no window: the config means another model.
    sliding, why = list(range(n)), "use_sliding_window=True"
  else:
    last = hf.get("max_window_layers", 28)
    sliding = {"qwen2": [i for i in range(n) if window is not None and i >= last],
               "qwen3": [i for i in range(n) if window is not None and i >= last],
               "qwen2_moe": [i for i in range(n) if (i + 1) % 2 and i < last],
               "qwen3_moe": list(range(n)) if window is not None else []}[model_type]
    why = "use_sliding_window=True" + (
        f", max_window_layers={last}" if model_type != "qwen3_moe" else "")
  if sliding:
    raise UnsupportedArchitectureError(
        f"{why} (sliding_window={window!r}) makes layers {sliding} sliding-window attention, "
        "which is not supported; only full attention")


# transformers' defaults (its config classes) for the config.json keys read here: a key
# absent from a file takes these, per architecture (Qwen3's head_dim is 128, not
# hidden_size / heads). A key written as null is left null: transformers resolves null KV
# heads (and Llama's null head_dim) from the heads. Absent KV heads: see _kv_heads.
_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
                    "hidden_act": "silu"}
_QWEN_DENSE_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768,
    "sliding_window": 4096, "max_window_layers": 28}
TRANSFORMERS_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32,
              "max_position_embeddings": 2048},
    "qwen2": _QWEN_DENSE_DEFAULTS,
    "qwen3": {**_QWEN_DENSE_DEFAULTS, "head_dim": 128},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_hidden_layers": 24, "num_attention_heads": 32,
                  "max_position_embeddings": 32768, "sliding_window": 4096,
                  "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    "qwen2_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                  "num_hidden_layers": 24, "num_attention_heads": 16,
                  "max_position_embeddings": 32768, "sliding_window": 4096,
                  "max_window_layers": 28, "num_experts": 60, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
}
_KV_HEADS_DEFAULTS = {"qwen2": 32, "qwen3": 32, "qwen3_moe": 4, "qwen2_moe": 16}


def _kv_heads(hf: dict) -> int:
  """num_key_value_heads as transformers resolves it (absent: the class default).

  Llama's default is the head count. Where the Qwen default does not divide the heads
  (4 heads, 32 KV heads), transformers builds a model it cannot run; the head count
  (plain multi-head attention) is then what such a file means.
  """
  heads = hf["num_attention_heads"]
  if "num_key_value_heads" in hf:
    return hf["num_key_value_heads"] or heads
  default = _KV_HEADS_DEFAULTS.get(hf["model_type"], heads)
  return default if heads % default == 0 else heads


def with_transformers_defaults(hf: dict) -> dict:
  """config.json with each key read here that it lacks set as transformers sets it."""
  out = {**_COMMON_DEFAULTS, **TRANSFORMERS_DEFAULTS[hf["model_type"]], **hf}
  if "num_experts" not in hf and hf.get("num_local_experts") is not None:
    out["num_experts"] = hf["num_local_experts"]  # Qwen3-MoE's attribute_map alias.
  return out


def model_overrides(hf: dict) -> dict[str, Any]:
  """Our ``config.model`` fields (dotted keys, e.g. ``"moe.num_experts"``) from config.json.

  Raises:
    UnsupportedArchitectureError: naming the model_type (and the supported list) or the
      option that has no equivalent here.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    arch = hf.get("architectures") or [model_type]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {arch[0]!r} (model_type={model_type!r}); supported "
        f"model_types: {', '.join(SUPPORTED_MODEL_TYPES)}")
  quant = hf.get("quantization_config")
  if quant:
    # Its tensors are packed or scaled (GPTQ/AWQ qweight+scales, FP8 weight_scale_inv, ...):
    # without this the import failed on a "missing tensor" or a "corrupt" file.
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    raise UnsupportedArchitectureError(
        f"quantization_config (quant_method={method!r}) is not supported: quantized "
        "weights cannot be imported; use the unquantized (bf16/fp16/fp32) checkpoint or a "
        "GGUF file")
  hf = with_transformers_defaults(hf)
  # transformers' ACT2FN maps both names to x * sigmoid(x).
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise UnsupportedArchitectureError(
        f"hidden_act={hf['hidden_act']!r}; only 'silu' (or its alias 'swish')")
  if hf.get("mlp_bias"):
    raise UnsupportedArchitectureError("mlp_bias=True is not supported")
  if model_type in ("llama", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
    raise UnsupportedArchitectureError(
        f"attention_bias=True ({model_type}: bias on the output projection too) is not supported")
  _check_full_attention(hf, model_type)
  heads = hf["num_attention_heads"]
  if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
    # Divided by below (head size, KV heads): 0 raised a bare ZeroDivisionError.
    raise UnsupportedArchitectureError(
        f"num_attention_heads={heads!r}; a model needs a positive number of heads")
  o = {
      "vocab_size": hf["vocab_size"],
      "d_model": hf["hidden_size"],
      "num_layers": hf["num_hidden_layers"],
      "num_heads": heads,
      "num_kv_heads": _kv_heads(hf),
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "mlp_dim": hf["intermediate_size"],
      # Qwen2-MoE always has q/k/v biases (transformers >= 5 writes qkv_bias).
      "qkv_bias": model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True)),
      "qk_norm": model_type in ("qwen3", "qwen3_moe"),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      **rope_overrides(hf),
      "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "moe.num_experts": 0,
  }
  if model_type in MOE_MODEL_TYPES:
    num_experts = hf["num_experts"]
    step = hf.get("decoder_sparse_step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
      # transformers divides by it ((i + 1) % step); ours became moe_every=0 and
      # first_dense_layers=-1, refused later under our own field names.
      raise UnsupportedArchitectureError(
          f"decoder_sparse_step={step!r}; only a positive integer")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
      raise UnsupportedArchitectureError(
          f"mlp_only_layers={dense}: only a leading run of dense layers is supported")
    if len(dense) > 0 and step != 1:
      raise UnsupportedArchitectureError(
          "mlp_only_layers together with decoder_sparse_step != 1 is not supported")
    # HF: layer i is sparse when (i + 1) % step == 0; ours: (i - first_dense) % every == 0.
    first_dense = len(dense) if step == 1 else step - 1
    o.update({
        "moe.num_experts": num_experts,
        "moe.top_k": hf["num_experts_per_tok"],
        "moe.expert_dim": hf["moe_intermediate_size"],
        "moe.shared_expert_dim": hf.get("shared_expert_intermediate_size", 0) or 0,
        # Qwen2-MoE gates its shared expert; a checkpoint without one has nothing to gate.
        "moe.shared_expert_gate": (model_type == "qwen2_moe"
                                   and bool(hf.get("shared_expert_intermediate_size", 0))),
        "moe.router_func": "softmax",
        "moe.router_mode": "token",
        "moe.normalize_topk": bool(hf.get("norm_topk_prob", False)),
        "moe.moe_every": step,
        "moe.first_dense_layers": first_dense,
    })
  o["_model_type"] = model_type
  if hf.get("max_position_embeddings"):
    # Not a field of ours (RoPE has no length limit); kept so export writes it back.
    o["_max_position_embeddings"] = int(hf["max_position_embeddings"])
  return o


def hf_config(overrides: dict[str, Any], extra: dict | None = None) -> dict:
  """The config.json of our model (inverse of ``model_overrides``)."""
  o = overrides
  model_type = o.get("_model_type") or (
      ("qwen2_moe" if o.get("moe.shared_expert_dim") else "qwen3_moe")
      if o.get("moe.num_experts") else
      "qwen3" if o.get("qk_norm") else "qwen2" if o.get("qkv_bias") else "llama")
  if o.get("moe.num_experts") and model_type not in MOE_MODEL_TYPES:
    raise UnsupportedArchitectureError(
        f"an MoE model exports as one of {MOE_MODEL_TYPES}, not {model_type}")
  if model_type == "qwen3_moe" and o.get("moe.shared_expert_dim"):
    raise UnsupportedArchitectureError("shared experts have no qwen3_moe equivalent")
  if model_type == "qwen2_moe" and o.get("moe.shared_expert_dim") and not o.get(
      "moe.shared_expert_gate"):
    raise UnsupportedArchitectureError("qwen2_moe's shared expert needs moe.shared_expert_gate")
  if model_type in ("qwen3", "qwen3_moe") and not o.get("qk_norm"):
    # Transformers always applies Qwen3's q/k RMSNorm: a model without it would load with
    # unit norms and compute something else.
    raise UnsupportedArchitectureError(
        f"{model_type} always normalizes q and k; this model has qk_norm=False (a token-"
        "routed MoE without qk_norm has no Hugging Face equivalent)")
  if o.get("qk_norm") and model_type not in ("qwen3", "qwen3_moe"):
    raise UnsupportedArchitectureError(f"qk_norm has no {model_type} equivalent")
  if o.get("qkv_bias") and model_type not in ("qwen2", "qwen2_moe"):
    raise UnsupportedArchitectureError(f"qkv_bias has no {model_type} equivalent")
  arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[model_type]
  hf = {
      "architectures": [arch], "model_type": model_type, "vocab_size": o["vocab_size"],
      "hidden_size": o["d_model"], "intermediate_size": o["mlp_dim"],
      "num_hidden_layers": o["num_layers"], "num_attention_heads": o["num_heads"],
      "num_key_value_heads": o["num_kv_heads"], "head_dim": o["head_dim"],
      "hidden_act": "silu", "rms_norm_eps": o["norm_eps"], **rope_config(o),
      "tie_word_embeddings": o["tie_embeddings"], "attention_bias": False, "mlp_bias": False,
      # hf.export sets it (hf.context_length); 8192 (unknown) for a model trained here.
      "max_position_embeddings": o.get("_max_position_embeddings", 8192),
      "torch_dtype": "float32",
  }
  if model_type == "qwen2":
    hf.update({"use_sliding_window": False, "sliding_window": None})
  if model_type in MOE_MODEL_TYPES:
    step, first = o.get("moe.moe_every", 1), o.get("moe.first_dense_layers", 0)
    if step != 1 and first != step - 1:
      raise UnsupportedArchitectureError(
          f"moe_every={step} with first_dense_layers={first} has no qwen3_moe equivalent")
    hf.update({
        "num_experts": o["moe.num_experts"], "num_local_experts": o["moe.num_experts"],
        "num_experts_per_tok": o["moe.top_k"], "moe_intermediate_size": o["moe.expert_dim"],
        "norm_topk_prob": o["moe.normalize_topk"], "decoder_sparse_step": step,
        "mlp_only_layers": list(range(first)) if step == 1 else [],
        "use_sliding_window": False, "sliding_window": None,
    })
    if model_type == "qwen2_moe":
      hf.update({"shared_expert_intermediate_size": o.get("moe.shared_expert_dim", 0),
                 "qkv_bias": bool(o.get("qkv_bias"))})
  hf.update(extra or {})
  return hf


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """How one of our parameters is made of HF tensors.

  Attributes:
    path: our parameter path (tuple of keys in the params tree).
    names: object ndarray of HF tensor names; its shape is our leading (stacked) axes
      (layers of a scanned stack, experts). A 0-d array for a single tensor.
    groups: for each HF axis in order, the our-axes (after the stacked ones, counted
      from 0) it holds, major to minor. E.g. q_proj [H*Dh, D] -> ((1, 2), (0,)) for our
      kernel [D, H, Dh].
  """

  path: tuple[str, ...]
  names: np.ndarray
  groups: tuple[tuple[int, ...], ...]

  @property
  def num_stacked(self) -> int:
    return self.names.ndim


def _layer_specs(cfg, model_type: str, i: int) -> list[tuple[tuple[str, ...], Any, tuple]]:
  """(our path within the layer, HF name or name array, groups) of layer i."""
  p = f"model.layers.{i}."
  lin_in_out = ((1,), (0,))  # HF [out, in] -> our [in, out].
  heads = ((1, 2), (0,))  # HF [H*Dh, D] -> our [D, H, Dh].
  specs = [
      (("attn_norm", "scale"), p + "input_layernorm.weight", ((0,),)),
      (("mlp_norm", "scale"), p + "post_attention_layernorm.weight", ((0,),)),
      (("attention", "query", "DenseGeneral_0", "kernel"), p + "self_attn.q_proj.weight", heads),
      (("attention", "key", "DenseGeneral_0", "kernel"), p + "self_attn.k_proj.weight", heads),
      (("attention", "value", "DenseGeneral_0", "kernel"), p + "self_attn.v_proj.weight", heads),
      (("attention", "out", "DenseGeneral_0", "kernel"), p + "self_attn.o_proj.weight",
       ((2,), (0, 1))),  # HF [D, H*Dh] -> our [H, Dh, D].
  ]
  if cfg.qkv_bias:
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      specs.append((("attention", ours, "DenseGeneral_0", "bias"),
                    p + f"self_attn.{theirs}_proj.bias", ((0, 1),)))
  if cfg.qk_norm:
    specs.append((("attention", "query_norm", "scale"), p + "self_attn.q_norm.weight", ((0,),)))
    specs.append((("attention", "key_norm", "scale"), p + "self_attn.k_norm.weight", ((0,),)))
  if cfg.is_moe_layer(i):
    e = cfg.moe.num_experts
    experts = lambda proj: np.array([p + f"mlp.experts.{j}.{proj}.weight" for j in range(e)],
                                    object)
    specs += [
        (("moe", "router"), p + "mlp.gate.weight", lin_in_out),  # [E, D] -> [D, E].
        (("moe", "wi_gate"), experts("gate_proj"), lin_in_out),  # [F, D] -> [D, F] per expert.
        (("moe", "wi_up"), experts("up_proj"), lin_in_out),
        (("moe", "wo"), experts("down_proj"), lin_in_out),  # [D, F] -> [F, D].
    ]
    if cfg.moe.shared_expert_dim:
      for proj in ("gate", "up", "down"):
        specs.append((("moe", "shared", proj, "DenseGeneral_0", "kernel"),
                      p + f"mlp.shared_expert.{proj}_proj.weight", lin_in_out))
    if cfg.moe.shared_expert_gate:  # [1, D] -> [D, 1].
      specs.append((("moe", "shared_gate"), p + "mlp.shared_expert_gate.weight", lin_in_out))
  else:
    specs += [
        (("mlp", "gate", "DenseGeneral_0", "kernel"), p + "mlp.gate_proj.weight", lin_in_out),
        (("mlp", "up", "DenseGeneral_0", "kernel"), p + "mlp.up_proj.weight", lin_in_out),
        (("mlp", "down", "DenseGeneral_0", "kernel"), p + "mlp.down_proj.weight", lin_in_out),
    ]
  del model_type
  return specs


def param_specs(cfg, model_type: str = "") -> list[ParamSpec]:
  """Every parameter of ``Transformer(cfg)`` with its HF source (layers scanned or not)."""
  specs = [ParamSpec(("embed", "embedding"), np.array("model.embed_tokens.weight", object),
                     ((0,), (1,))),
           ParamSpec(("final_norm", "scale"), np.array("model.norm.weight", object), ((0,),))]
  if not cfg.tie_embeddings:
    specs.append(ParamSpec(("lm_head", "DenseGeneral_0", "kernel"),
                           np.array("lm_head.weight", object), ((1,), (0,))))
  start = 0
  for seg, (_, count) in enumerate(cfg.layer_segments()):
    per_layer = [_layer_specs(cfg, model_type, start + i) for i in range(count)]
    if cfg.scan_layers:
      for j, (sub, _, groups) in enumerate(per_layer[0]):
        names = np.stack([np.asarray(layer[j][1], object) for layer in per_layer])
        specs.append(ParamSpec((f"stack_{seg}",) + sub, names, groups))
    else:
      for i, layer in enumerate(per_layer):
        for sub, names, groups in layer:
          specs.append(ParamSpec((f"layer_{start + i}",) + sub, np.asarray(names, object),
                                 groups))
    start += count
  return specs
