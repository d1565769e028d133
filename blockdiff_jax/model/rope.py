"""Rotary position embeddings with HF-style scaling (linear, NTK-aware, YaRN)."""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

Array = Any

SCALING_TYPES = ("none", "linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How rotary frequencies are stretched for contexts beyond pre-training.

  Attributes:
    type: "none", "linear" (positions / factor), "ntk" (base * factor^(d/(d-2))) or
      "yarn" (per-dimension ramp between beta_fast and beta_slow plus an attention
      temperature 0.1 * ln(factor) + 1), configured like HF's ``rope_scaling``.
    factor: context extension factor s.
    original_max_position: pre-training context length (YaRN only).
    beta_fast: YaRN's fast boundary (rotations per context).
    beta_slow: YaRN's slow boundary.
  """

  type: str = "none"
  factor: float = 1.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0

  def __post_init__(self):
    if self.type not in SCALING_TYPES:
      raise ValueError(f"rope_scaling.type must be one of {SCALING_TYPES}, got {self.type!r}")
    if self.factor < 1.0:
      raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[Array, float]:
  """Returns (inverse frequencies [head_dim // 2], attention scale multiplier)."""
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
    def dim_for(rotations):
      return head_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (
          2 * math.log(theta))
    low = max(math.floor(dim_for(scaling.beta_fast)), 0)
    high = min(math.ceil(dim_for(scaling.beta_slow)), head_dim // 2 - 1)
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / max(high - low, 1e-3),
                    0.0, 1.0)
    keep = 1.0 - ramp
    inv = inv / s * (1.0 - keep) + inv * keep
    attn_factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
  return inv, attn_factor


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates x [batch, length, heads, head_dim] by positions [batch, length].

  Uses the half-split (GPT-NeoX / HF Llama) layout: the first and second halves of
  the head dimension form the rotated pairs.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
