"""GGUF (llama.cpp) files -> a Hugging Face config, HF-named fp32 tensors, tokenizer.

Quantized tensors (Q4_0/Q4_1/Q8_0/K-quants ... whatever the ``gguf`` package's numpy
dequantizer knows) become float32. llama.cpp's converter permutes the rows of Q and K of
``llama`` models for its interleaved RoPE: within each head of size d, row ``2j + r``
holds HF row ``j + r*d/2``; ``unpermute_rows`` undoes it. Qwen models are stored in HF's
order (llama.cpp uses NeoX RoPE for them). Linear and YaRN RoPE scaling
(``rope.scaling.type``/``factor``) become transformers' ``linear`` and ``yarn`` rope types.
Llama-3.1+ RoPE scaling, which llama.cpp stores as per-frequency divisors
(``rope_freqs.weight``), becomes the equivalent ``llama3`` ``rope_scaling``
(``llama3_rope_scaling``).
"""

import logging
import math
import os
import re
from typing import Any

import numpy as np

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.model import rope

# GGUF general.architecture -> HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen3moe": "qwen3_moe"}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_EXPERT_TENSORS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                   "ffn_down_exps.weight": "down_proj"}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (rows = num_heads * head_dim)."""
  d = w.shape[0] // num_heads
  return w.reshape(num_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (HF order -> GGUF order); for tests and export."""
  d = w.shape[0] // num_heads
  return w.reshape(num_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: str):
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path}")
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:  # The reader raises ValueError, struct.error, IndexError...
    raise safetensors_io.CorruptCheckpointError(
        f"{path}: not a readable GGUF file (corrupt or truncated): {type(e).__name__}: {e}"
    ) from e


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def metadata(path: str) -> dict[str, Any]:
  """All metadata of a GGUF file but the vocabulary arrays (tokens, merges, types, scores)."""
  reader = _reader(path)
  out = {}
  for key, f in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key[len("tokenizer.ggml."):] in (
        "tokens", "merges", "token_type", "scores"):
      continue
    out[key] = f.contents()
  return out


def _f32(x) -> float:
  """A float32 metadata value as the decimal it was written from (1e-5, not 9.99e-06)."""
  return float(str(np.float32(x)))


_REQUIRED = object()


def _int_key(g, where: str, key: str, default: Any = _REQUIRED) -> int:
  """An integer hyperparameter, as llama.cpp reads it.

  llama.cpp also accepts one value per layer (an array) for the head counts and the
  feed-forward length; the same value for every layer is the plain model.

  Raises:
    CorruptCheckpointError: a required key is missing (llama.cpp refuses the file too).
    UnsupportedArchitectureError: per-layer values that differ.
  """
  value = g(key)
  if value is None:
    if default is _REQUIRED:
      raise safetensors_io.CorruptCheckpointError(f"{where}.{key} is missing (required)")
    return int(default)
  if isinstance(value, list):
    if not value or any(v != value[0] for v in value):
      raise architectures.UnsupportedArchitectureError(
          f"{where}.{key}={value}: a different value per layer is not supported")
    value = value[0]
  return int(value)


# Types of the ``<arch>.*`` keys read here (others: a number). llama.cpp refuses a key of
# the wrong type; int()/float() would take the string "4" as 4 and the float 5.5 as 5.
_INT_KEYS = frozenset({
    "vocab_size", "embedding_length", "feed_forward_length", "block_count", "context_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length",
    "rope.dimension_count", "rope.scaling.original_context_length", "expert_count",
    "expert_used_count", "expert_feed_forward_length"})
_PER_LAYER_KEYS = frozenset({"attention.head_count", "attention.head_count_kv",
                             "feed_forward_length"})
_STR_KEYS = frozenset({"rope.scaling.type"})
_BOOL_KEYS = frozenset({"expert_weights_norm"})


def _typed(value: Any, where: str, key: str) -> Any:
  """``value`` of key ``where.key`` if it has the type llama.cpp reads it as.

  Raises:
    CorruptCheckpointError: naming the key, its value and the type wanted.
  """
  if value is None:
    return None
  if key in _STR_KEYS:
    ok, want = isinstance(value, str), "a string"
  elif key in _BOOL_KEYS:
    ok, want = isinstance(value, bool), "a bool"
  else:
    items = value if isinstance(value, list) and key in _PER_LAYER_KEYS else [value]
    kinds, want = ((int,), "an integer") if key in _INT_KEYS else ((int, float), "a number")
    if key in _PER_LAYER_KEYS:
      want += " (or one per layer)"
    ok = all(isinstance(v, kinds) and not isinstance(v, bool) for v in items)
  if not ok:
    raise safetensors_io.CorruptCheckpointError(
        f"{where}.{key}={value!r} has the wrong type; llama.cpp reads {want}")
  return value


def hf_config_from_metadata(reader, path: str, has_output: bool) -> dict:
  arch = _field(reader, "general.architecture")
  if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
    raise architectures.UnsupportedArchitectureError(
        f"{path}: unsupported GGUF architecture {arch!r}; supported: "
        f"{', '.join(GGUF_ARCHITECTURES)}")

  def g(key: str, default: Any = None) -> Any:
    value = _typed(_field(reader, f"{arch}.{key}"), f"{path}: {arch}", key)
    return default if value is None else value

  n = lambda k, d=_REQUIRED: _int_key(g, f"{path}: {arch}", k, d)
  heads = n("attention.head_count")
  kv_heads = n("attention.head_count_kv", heads)
  for key, value in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
    if value < 1:  # The head size below divides by it; llama.cpp cannot run it either.
      raise safetensors_io.CorruptCheckpointError(
          f"{path}: {arch}.{key}={value}; a model needs at least one head")
  d_model = n("embedding_length")
  tokens = _field(reader, "tokenizer.ggml.tokens") or []
  hf = {
      "model_type": GGUF_ARCHITECTURES[arch],
      "vocab_size": n("vocab_size", len(tokens)),
      "hidden_size": d_model,
      "intermediate_size": n("feed_forward_length", 0),
      "num_hidden_layers": n("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": int(g("attention.key_length", d_model // heads)),
      "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": _f32(g("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(g("context_length", 2048)),
      "tie_word_embeddings": not has_output,
      "hidden_act": "silu",
  }
  value_length = g("attention.value_length")
  if value_length is not None and int(value_length) != hf["head_dim"]:
    # One head size for Q, K and V here (and in llama.cpp's llama): converted, the V
    # projection failed only later, in hf.check, as a bare shape mismatch.
    raise architectures.UnsupportedArchitectureError(
        f"{path}: {arch}.attention.value_length={value_length} differs from the key "
        f"length {hf['head_dim']}; only equal K and V head sizes are supported")
  scaling = _rope_scaling(g, f"{path}: {arch}", hf["max_position_embeddings"])
  if scaling is not None:
    hf["rope_scaling"] = scaling
  rotated = g("rope.dimension_count")
  if rotated is not None and int(rotated) != hf["head_dim"]:
    raise architectures.UnsupportedArchitectureError(
        f"{path}: {arch}.rope.dimension_count={int(rotated)} (RoPE on only part of each head "
        f"of {hf['head_dim']}) is not supported")
  if arch == "qwen3moe":
    hf.update({"num_experts": n("expert_count"),
               "num_experts_per_tok": n("expert_used_count"),
               "moe_intermediate_size": n("expert_feed_forward_length"),
               # llama.cpp's qwen3moe always renormalizes the top-k weights.
               "norm_topk_prob": bool(g("expert_weights_norm", True))})
  return hf


# llama.cpp's YaRN keys that only some of its architectures read (grok, gpt-oss ...), with
# the value it computes with for llama and Qwen models, which ignore them.
_YARN_IGNORED_KEYS = {"yarn_ext_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0,
                      "yarn_log_multiplier": 0.0}


def _rope_scaling(g, where: str, context_length: int) -> dict | None:
  """HF ``rope_scaling`` of the RoPE scaling keys, read as llama.cpp reads them.

  llama.cpp divides positions by ``rope.scaling.factor`` (else the older
  ``rope.scale_linear``; 0 or absent means 1) unless ``rope.scaling.type`` is "none",
  and the type defaults to "linear"; that is transformers' "linear" rope type. Type
  "yarn" is transformers' "yarn" with that factor and ``rope.scaling.original_context_length``
  (else the context length) as ``original_max_position_embeddings``: llama.cpp (ggml's
  ``rope_yarn``) ramps between the same floored/ceiled bounds for beta 32 and 1 and scales
  cos and sin by 1 + 0.1 ln(factor), transformers' default attention factor.
  ``rope.scaling.finetuned`` is a flag that changes nothing computed.

  Raises:
    UnsupportedArchitectureError: for another scaling type (longrope ...), a
      ``rope.scaling.attn_factor`` other than 1 (llama.cpp scales cos and sin by it), or a
      YaRN key on which llama.cpp and transformers compute differently (named).
  """
  attn_factor = g("rope.scaling.attn_factor")
  if attn_factor not in (None, 1.0):
    raise architectures.UnsupportedArchitectureError(
        f"{where}.rope.scaling.attn_factor={_f32(attn_factor)} (RoPE outputs scaled) is not "
        "supported; only 1")
  scaling_type = g("rope.scaling.type") or "linear"
  if scaling_type == "none":
    return None  # llama.cpp never scales then, whatever the factor says.
  if scaling_type not in ("linear", "yarn"):
    raise architectures.UnsupportedArchitectureError(
        f"{where}.rope.scaling.type={scaling_type!r} is not supported (only 'linear', 'yarn' "
        "or 'none')")
  factor = g("rope.scaling.factor")
  if factor is None:
    factor = g("rope.scale_linear")
  if scaling_type == "yarn":
    _check_yarn_keys(g, where, 1.0 if factor in (None, 0.0) else factor)
  if factor in (None, 0.0, 1.0):
    return None  # YaRN too: no interpolation, and a temperature of 1.
  if factor < 1.0:  # Positions stretched rather than compressed: no rope type of ours.
    raise architectures.UnsupportedArchitectureError(
        f"{where}.rope.scaling.factor={_f32(factor)} is not supported; only factors >= 1")
  if scaling_type == "linear":
    return {"rope_type": "linear", "factor": _f32(factor)}
  # llama.cpp: n_ctx_orig_yarn, 0 or absent meaning the training context.
  original = int(g("rope.scaling.original_context_length", 0) or context_length)
  return {"rope_type": "yarn", "factor": _f32(factor),
          "original_max_position_embeddings": original}


def _check_yarn_keys(g, where: str, factor: float) -> None:
  """Refuses YaRN keys on which llama.cpp (for llama/Qwen) and transformers disagree.

  llama.cpp's converter writes them from the HF config (beta_fast, beta_slow,
  attention_factor ...), where transformers applies them; llama.cpp's llama and Qwen
  models never read them and compute with the defaults. Only the defaults map exactly.
  """
  for key, used in _YARN_IGNORED_KEYS.items():
    value = g(f"rope.scaling.{key}")
    if value is not None and not math.isclose(value, used, rel_tol=1e-6, abs_tol=1e-7):
      raise architectures.UnsupportedArchitectureError(
          f"{where}.rope.scaling.{key}={_f32(value)} is not supported: llama.cpp ignores it "
          f"for this architecture (computing with {used}) while transformers would apply it; "
          f"only {used}")
  value = g("rope.scaling.yarn_attn_factor")
  # llama.cpp scales cos and sin by 1 + 0.1 ln(factor) whatever this key says.
  derived = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
  if value is not None and not math.isclose(value, derived, rel_tol=1e-6):
    raise architectures.UnsupportedArchitectureError(
        f"{where}.rope.scaling.yarn_attn_factor={_f32(value)} is not supported: llama.cpp "
        f"scales RoPE by 1 + 0.1 ln(factor) = {derived:.6g} for this architecture while "
        "transformers would use the key's value; only that value")


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(HF config.json dict, HF-named float32 tensors) of a GGUF model file.

  Raises:
    UnsupportedArchitectureError: for an architecture not in GGUF_ARCHITECTURES, a
      rope.scaling.type other than linear/yarn/none (or YaRN keys llama.cpp ignores set
      to other than their defaults), a rope.dimension_count below the head size, or a
      rope_freqs.weight tensor that is not llama3 scaling (or comes with a scaled factor).
    UnsupportedArchitectureError: also for a tensor of a GGML type we cannot read (I32 ...),
      a big-endian file's tensor other than F16/F32/F64, or per-layer head counts /
      feed-forward lengths that differ, naming them.
    CheckpointMismatchError-like ValueError: for a tensor name without HF equivalent.
    CorruptCheckpointError: naming the file when it cannot be parsed or dequantized, lacks
      a required key, has a key of the wrong type or no heads, or a llama Q/K tensor whose
      rows are not its heads times the head size.
  """
  reader = _reader(path)
  names = {t.name for t in reader.tensors}
  hf = hf_config_from_metadata(reader, path, "output.weight" in names)
  arch = _field(reader, "general.architecture")
  tensors = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      # llama.cpp's form of Llama-3.1+ RoPE scaling (no rope.scaling.type key): ignoring
      # it would silently compute another model.
      divisors = np.asarray(_dequantize(reader, t, path), np.float64)
      if "rope_scaling" in hf:  # llama.cpp would apply both; one rope type here.
        raise architectures.UnsupportedArchitectureError(
            f"{path}: rope_freqs.weight (llama3 RoPE scaling) together with "
            f"{hf['rope_scaling']['rope_type']} scaling (factor {hf['rope_scaling']['factor']}) "
            "is not supported")
      try:
        hf["rope_scaling"] = llama3_rope_scaling(divisors.reshape(-1), hf["head_dim"],
                                                 hf["rope_theta"])
      except ValueError as e:
        raise architectures.UnsupportedArchitectureError(f"{path}: {e}") from e
      continue
    # Only "blk.<digits>.<tensor>": "blk.0" or "blk.x.attn_q.weight" have no HF name.
    block = _BLOCK_NAME.fullmatch(t.name)
    rest = block.group(2) if block else t.name
    if t.name in _GLOBAL_TENSORS:
      hf_name = _GLOBAL_TENSORS[t.name]
    elif block and rest in _LAYER_TENSORS:
      hf_name = f"model.layers.{int(block.group(1))}.{_LAYER_TENSORS[rest]}"
    elif block and rest in _EXPERT_TENSORS:
      hf_name = f"model.layers.{int(block.group(1))}.mlp.experts.*.{_EXPERT_TENSORS[rest]}.weight"
    else:
      raise ValueError(f"{path}: unexpected tensor {t.name!r} (no HF equivalent)")
    shape = tuple(int(s) for s in reversed(t.shape))
    try:
      w = np.asarray(_dequantize(reader, t, path), np.float32).reshape(shape)
    except architectures.UnsupportedArchitectureError:
      raise
    except NotImplementedError as e:  # A valid file of a type we cannot read (I32 ...).
      raise architectures.UnsupportedArchitectureError(
          f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which is not "
          f"supported ({e})") from e
    except Exception as e:
      raise safetensors_io.CorruptCheckpointError(
          f"{path}: cannot read tensor {t.name!r} ({t.tensor_type.name}, shape {shape}): "
          f"{type(e).__name__}: {e}") from e
    if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
      key = "head_count" if rest == "attn_q.weight" else "head_count_kv"
      heads = hf["num_attention_heads" if key == "head_count" else "num_key_value_heads"]
      if w.ndim != 2 or w.shape[0] != heads * hf["head_dim"] or hf["head_dim"] % 2:
        # Unpermuting rows the metadata does not describe fails deep in numpy or, when
        # the count happens to divide, silently scrambles them.
        raise safetensors_io.CorruptCheckpointError(
            f"{path}: tensor {t.name!r} has shape {shape} but llama.attention.{key}={heads} "
            f"heads of size {hf['head_dim']} need {heads * hf['head_dim']} rows (of an even "
            "head size)")
      w = unpermute_rows(w, heads)
    if "*" in hf_name:
      for j in range(w.shape[0]):
        tensors[hf_name.replace("*", str(j))] = w[j]
    else:
      tensors[hf_name] = w
  if hf["intermediate_size"] == 0 and "model.layers.0.mlp.gate_proj.weight" in tensors:
    hf["intermediate_size"] = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
  return hf, tensors


_BLOCK_NAME = re.compile(r"blk\.([0-9]+)\.(.+)")
_FLOAT_TYPES = {"F16", "F32", "F64"}  # Typed arrays in the reader, in the file's byte order.


def _dequantize(reader, t, path: str) -> np.ndarray:
  """A tensor's values as float32 (or float64 for F64), in this machine's byte order.

  The reader gives F16/F32/F64 tensors of a big-endian file as byte-swapped arrays, which
  ``astype`` converts; the gguf package's dequantizer reinterprets the bytes in the host's
  order (``view``), reading such a tensor as garbage. Quantized blocks carry their scales
  in the file's byte order, which the dequantizer cannot read either: refused, as are the
  other types of such a file (BF16, integers), which it would read in the host's order.

  Raises:
    UnsupportedArchitectureError: a tensor other than F16/F32/F64 of a big-endian file.
    NotImplementedError: a GGML type without dequantizer (I32 ...).
  """
  import gguf  # pylint: disable=g-import-not-at-top
  if t.tensor_type.name in _FLOAT_TYPES:
    return t.data.astype(np.float64 if t.tensor_type.name == "F64" else np.float32)
  if reader.byte_order == "S":
    raise architectures.UnsupportedArchitectureError(
        f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name} in a file of the "
        "other byte order (big-endian), which is not supported; only its F16/F32/F64 "
        "tensors can be read")
  return gguf.quants.dequantize(t.data, t.tensor_type)


def llama3_rope_scaling(divisors: np.ndarray, head_dim: int, theta: float) -> dict:
  """HF ``rope_scaling`` (llama3) equivalent to llama.cpp's ``rope_freqs.weight``.

  llama.cpp divides inverse frequency i by ``divisors[i]``: 1 where a frequency turns more
  than high_freq_factor times over the original context, ``factor`` where it turns fewer
  than low_freq_factor times, and in between ``1 / ((1 - r) / factor + r)`` with r linear
  in turns. Only ``factor`` and the two bounding wavelengths follow from the divisors, so
  ``original_max_position_embeddings`` is set to the low one (``low_freq_factor`` 1, as in
  every Llama 3.x); those wavelengths need two divisors on the ramp to be pinned down.

  Raises:
    ValueError: the divisors are not llama3 scaling, or do not determine it.
  """
  if divisors.shape != (head_dim // 2,):
    raise ValueError(f"rope_freqs.weight has shape {divisors.shape}; llama3 scaling has one "
                     f"divisor per frequency ({head_dim // 2} for head_dim {head_dim})")
  factor = float(divisors.max())
  turns_per_token = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
  kept = np.isclose(divisors, 1.0, rtol=1e-6, atol=0)
  on_ramp = ~kept & ~np.isclose(divisors, factor, rtol=1e-6, atol=0)
  if factor <= 1.0 or np.count_nonzero(on_ramp) < 2:
    raise ValueError(
        f"rope_freqs.weight {np.round(divisors, 4).tolist()}: llama3 RoPE scaling needs a "
        "factor > 1 and at least two frequencies on its ramp to be recovered (the "
        "wavelengths where the ramp starts and ends are otherwise undetermined)")
  ramp = (1.0 / divisors[on_ramp] - 1.0 / factor) / (1.0 - 1.0 / factor)
  slope, intercept = np.polyfit(turns_per_token[on_ramp], ramp, 1)
  if not (slope > 0 and intercept < 0):  # The ramp must rise with frequency, from 0.
    raise ValueError(f"rope_freqs.weight {np.round(divisors, 4).tolist()} is not llama3 RoPE "
                     "scaling (its divisors do not fall from low to high frequencies)")
  low_wavelength, high_wavelength = slope / -intercept, slope / (1.0 - intercept)
  original = int(round(low_wavelength))
  scaling = {"rope_type": "llama3", "factor": factor,
             "low_freq_factor": float(round(original / low_wavelength, 5)),
             "high_freq_factor": float(round(original / high_wavelength, 5)),
             "original_max_position_embeddings": original}
  try:
    ours = rope.RopeScaling("llama3", factor, original,
                            low_freq_factor=scaling["low_freq_factor"],
                            high_freq_factor=scaling["high_freq_factor"])
  except ValueError as e:
    raise ValueError(f"rope_freqs.weight is not llama3 RoPE scaling ({e})") from e
  inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  got = 1.0 / np.asarray(rope.llama3_frequency_multipliers(inv, ours), np.float64)
  if not np.allclose(got, divisors, rtol=1e-5, atol=0):
    raise ValueError(
        f"rope_freqs.weight {np.round(divisors, 4).tolist()} is not llama3 RoPE scaling "
        f"(the closest, {scaling}, gives {np.round(got, 4).tolist()})")
  return scaling


def rest_of(name: str) -> str:
  return name.split(".", 2)[2] if name.startswith("blk.") else name


def tokenizer_metadata(path: str) -> dict[str, Any]:
  """Tokenizer fields: model, pre, tokens, token_type, merges, special ids, chat_template."""
  reader = _reader(path)
  t = lambda k, d=None: _field(reader, f"tokenizer.ggml.{k}", d)
  meta = {
      "model": t("model"), "pre": t("pre", "default"), "tokens": t("tokens"),
      "token_type": t("token_type"), "merges": t("merges"),
      "bos_token_id": t("bos_token_id"), "eos_token_id": t("eos_token_id"),
      "padding_token_id": t("padding_token_id"), "unknown_token_id": t("unknown_token_id"),
      "add_bos_token": t("add_bos_token", False),
      "chat_template": _field(reader, "tokenizer.chat_template"),
  }
  # An optional id past the vocabulary (padding_token_id 2**32 - 1, uint32 -1, is found in
  # the wild): llama.cpp warns and uses none, so does this reader. The eos id stays as is
  # (the tokenizer refuses a bad one).
  for key in ("bos_token_id", "padding_token_id", "unknown_token_id"):
    if meta[key] is not None and not 0 <= meta[key] < len(meta["tokens"] or ()):
      logging.warning("%s: tokenizer.ggml.%s=%s is no id of its %d tokens; using none",
                      path, key, meta[key], len(meta["tokens"] or ()))
      meta[key] = None
  return meta
