"""Rotary position embeddings with HF-style scaling (linear, NTK-aware, YaRN, Llama 3)."""

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp

Array = Any

SCALING_TYPES = ("none", "linear", "ntk", "yarn", "llama3")

# The RopeScaling fields each type reads; the others do not change what it computes.
FIELDS_BY_TYPE = {
    "none": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "truncate",
             "attention_factor", "mscale", "mscale_all_dim"),
    "llama3": ("factor", "original_max_position", "low_freq_factor", "high_freq_factor"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How rotary frequencies are stretched for contexts beyond pre-training.

  Field names and semantics follow ``transformers``' ``rope_parameters``
  (``rope_type`` "linear", "yarn", "llama3"). "ntk" is static: transformers has no
  static NTK type, and its "dynamic" leaves the base unscaled up to max_position_embeddings
  M, reaching our base * factor^(d/(d-2)) only at length M (2 factor - 1) / factor, so
  neither maps onto the other exactly (HF import refuses "dynamic", export refuses "ntk").

  Attributes:
    type: "none", "linear" (positions / factor), "ntk" (base * factor^(d/(d-2))),
      "yarn" (per-dimension ramp between beta_fast and beta_slow plus an attention
      temperature 0.1 * ln(factor) + 1) or "llama3" (Llama 3.1+: frequencies turning
      fewer than low_freq_factor times over the original context are divided by
      factor, those turning more than high_freq_factor times kept, a ramp in turns
      between; no temperature).
    factor: context extension factor s.
    original_max_position: pre-training context length (YaRN and llama3).
    beta_fast: YaRN's fast boundary (rotations per original context).
    beta_slow: YaRN's slow boundary.
    truncate: YaRN: round the ramp's bounds outwards to whole dimensions
      (floor/ceil), as the YaRN paper's code and ``transformers`` do by default;
      False keeps the fractional bounds (gpt-oss style).
    attention_factor: YaRN: explicit attention temperature; None derives it from
      ``factor`` (and ``mscale``/``mscale_all_dim`` when both are set).
    mscale: YaRN (DeepSeek style): numerator scale of the derived temperature.
    mscale_all_dim: YaRN (DeepSeek style): denominator scale of it.
    low_freq_factor: llama3: turns over the original context below which a frequency
      is fully interpolated (Llama 3.1/3.2 use 1).
    high_freq_factor: llama3: turns above which a frequency is kept (Llama 3.x: 4).
  """

  type: str = "none"
  factor: float = 1.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0

  def __post_init__(self):
    if self.type not in SCALING_TYPES:
      raise ValueError(f"model.rope_scaling.type must be one of {SCALING_TYPES}, got {self.type!r}")
    # NaN passes every comparison below and inf most of them; either one turns the
    # frequencies or the attention temperature NaN / inf / 0 (training NaNs at step 1)
    # or fails later inside math.log without naming the field.
    for name in ("factor", "original_max_position", "beta_fast", "beta_slow",
                 "attention_factor", "mscale", "mscale_all_dim", "low_freq_factor",
                 "high_freq_factor"):
      value = getattr(self, name)
      # None (a null in a config file) or a string failed the comparisons below with
      # a TypeError naming no field; only the three YaRN temperature fields may be None.
      if value is None and name in ("attention_factor", "mscale", "mscale_all_dim"):
        continue
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"model.rope_scaling.{name} must be a number, got {value!r}")
      if not math.isfinite(value):
        raise ValueError(f"model.rope_scaling.{name} must be finite, got {value}")
    if self.factor < 1.0:
      raise ValueError(f"model.rope_scaling.factor must be >= 1, got {self.factor}")
    if self.original_max_position < 1:
      raise ValueError(f"model.rope_scaling.original_max_position must be >= 1, got "
                       f"{self.original_max_position}")
    for name in ("beta_fast", "beta_slow"):
      if not getattr(self, name) > 0:
        raise ValueError(f"model.rope_scaling.{name} must be > 0, got {getattr(self, name)}")
    # YaRN's ramp runs from beta_fast (more turns) down to beta_slow: reversed, it
    # silently interpolates the fast dimensions and keeps the slow ones, the opposite
    # of YaRN (transformers only warns).
    if self.type == "yarn" and self.beta_fast < self.beta_slow:
      raise ValueError(f"model.rope_scaling.beta_fast must be >= beta_slow for yarn, got "
                       f"beta_fast={self.beta_fast}, beta_slow={self.beta_slow}")
    if self.attention_factor is not None and self.attention_factor <= 0:
      raise ValueError(f"model.rope_scaling.attention_factor must be > 0, got "
                       f"{self.attention_factor}")
    # Each temperature 0.1 * m * ln(factor) + 1 must be > 0: a zero denominator divides by
    # zero, a zero or negative one gives NaN / zero / flipped attention logits.
    if (self.type == "yarn" and self.mscale and self.mscale_all_dim
        and self.attention_factor is None):  # An explicit factor replaces the two.
      for name in ("mscale", "mscale_all_dim"):
        if not _yarn_temperature(self.factor, getattr(self, name)) > 0:
          raise ValueError(
              f"model.rope_scaling.{name}={getattr(self, name)} gives YaRN's temperature "
              f"0.1 * {name} * ln(factor={self.factor}) + 1 <= 0")
    # Equal bounds would divide by zero in the llama3 ramp (transformers only warns).
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ValueError(f"model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                       f"{self.low_freq_factor}, {self.high_freq_factor}")


def scaling_from_config(section) -> RopeScaling:
  """The RopeScaling of a ``model.rope_scaling`` config section (validated).

  Only the fields its type reads (``FIELDS_BY_TYPE``) are taken; the others keep their
  defaults, so configs that compute the same RoPE give equal RopeScalings. Fields absent
  from the section (configs saved before they existed) take their defaults too.
  """
  scaling_type = section.get("type", "none")
  if scaling_type not in SCALING_TYPES:
    raise ValueError(f"model.rope_scaling.type must be one of {SCALING_TYPES}, "
                     f"got {scaling_type!r}")
  return RopeScaling(type=scaling_type, **{name: section[name] for name in
                                           FIELDS_BY_TYPE[scaling_type] if name in section})


def _yarn_temperature(scale: float, mscale: float = 1.0) -> float:
  return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def yarn_attention_factor(scaling: RopeScaling) -> float:
  """YaRN's attention temperature (multiplies q and k, so logits get its square)."""
  if scaling.attention_factor is not None:
    return float(scaling.attention_factor)
  if scaling.mscale and scaling.mscale_all_dim:
    return (_yarn_temperature(scaling.factor, scaling.mscale)
            / _yarn_temperature(scaling.factor, scaling.mscale_all_dim))
  return _yarn_temperature(scaling.factor)


def yarn_ramp_bounds(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[float, float]:
  """(low, high) frequency indices between which YaRN blends interpolation in.

  Index i (frequency theta^(-2i/d)) turns r times over the original context at
  i = d * ln(L / (2 pi r)) / (2 ln theta). Bounds are clamped to [0, d - 1] -- the
  upper clamp is ``head_dim - 1`` although only d/2 indices exist, exactly as in
  the YaRN reference code and ``transformers``; clamping to d/2 - 1 instead moves
  the ramp and changes the frequencies by up to ~70% for long original contexts.
  """
  def index_for(rotations):
    return head_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))
  low, high = index_for(scaling.beta_fast), index_for(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, head_dim - 1)


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[Array, float]:
  """Returns (inverse frequencies [head_dim // 2], attention scale multiplier).

  Matches ``transformers.modeling_rope_utils`` ("linear", "yarn", "llama3", and "dynamic" at
  ``seq_len = M (2 factor - 1) / factor`` for M = max_position_embeddings -- at
  ``seq_len <= M`` "dynamic" does not scale at all) in inverse frequencies and
  attention factor; the factor multiplies both q and k, like HF's cos/sin scaling.
  """
  if head_dim < 4 or head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim >= 4, got {head_dim}")
  dims = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  s = scaling.factor
  if scaling.type == "ntk":
    theta = theta * s ** (head_dim / (head_dim - 2))
  inv = 1.0 / theta ** dims
  if scaling.type == "linear":
    inv = inv / s
  attn_factor = 1.0
  if scaling.type == "yarn":
    # Dimensions that rotate fast (many turns over the original context) keep their
    # frequency; slow ones are interpolated by s; a linear ramp blends in between.
    low, high = yarn_ramp_bounds(head_dim, theta, scaling)
    if low == high:
      high += 1e-3  # A step instead of a ramp, without dividing by zero.
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low),
                    0.0, 1.0)
    keep = 1.0 - ramp
    inv = inv / s * (1.0 - keep) + inv * keep
    attn_factor = yarn_attention_factor(scaling)
  if scaling.type == "llama3":
    inv = inv * llama3_frequency_multipliers(inv, scaling)
  return inv, attn_factor


def llama3_frequency_multipliers(inv_freq: Array, scaling: RopeScaling) -> Array:
  """What llama3 scaling multiplies each inverse frequency by (1 / factor to 1).

  llama.cpp stores the reciprocals as a GGUF's ``rope_freqs.weight`` tensor. Only
  ``factor`` and the wavelengths ``original_max_position / low_freq_factor`` and
  ``original_max_position / high_freq_factor`` matter, not the three values apart.
  """
  turns = scaling.original_max_position * inv_freq / (2 * math.pi)  # Over the original context.
  ramp = jnp.clip((turns - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor), 0.0, 1.0)
  return (1.0 - ramp) / scaling.factor + ramp


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates x [batch, length, heads, head_dim] by positions [batch, length].

  Uses the half-split (GPT-NeoX / HF Llama) layout: the first and second halves of
  the head dimension form the rotated pairs.
  """
  # Checked here because the shapes would otherwise broadcast: a single frequency
  # silently rotates every pair of a wider head alike, and 1-D positions fail deep in
  # indexing with no mention of the layout.
  if jnp.ndim(x) != 4 or jnp.ndim(positions) != 2:
    raise ValueError(f"apply_rope takes x [batch, length, heads, head_dim] and positions "
                     f"[batch, length], got {jnp.shape(x)} and {jnp.shape(positions)}")
  if x.shape[-1] != 2 * jnp.shape(inv_freq)[-1]:
    raise ValueError(f"apply_rope: head_dim {x.shape[-1]} needs {x.shape[-1] / 2:g} inverse "
                     f"frequencies (head_dim / 2), got {jnp.shape(inv_freq)[-1]}")
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
