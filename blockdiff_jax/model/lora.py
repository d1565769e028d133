"""(Gated) LoRA adapters on the dense projections.

A LoRA adapter adds ``scale * (x A) B`` (``scale = alpha / rank``) to a projection;
B starts at zero, so a fresh adapter leaves the model equal to its base. With
``gated`` the adapter's output is multiplied by a per-token gate that is 1 on MASK
tokens and 0 elsewhere (I-DLM's gated LoRA): clean tokens then run the untouched
base weights, so a causal verifier over clean tokens is the base AR model exactly.
With the gate off it is plain LoRA (Fast-dLLM-style fine-tuning), and ``merge_adapters``
folds it into the base weights for inference: ``W + scale * A B`` is the same map, as
a model without adapters (no measurable speed change in the cached decoders on a 2-core
CPU: experiments/lora_fold_speed.py).
"""

import collections.abc
import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

# Projections an adapter may sit on (attention q/k/v/o, dense SwiGLU gate/up/down).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

Array = Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Static LoRA options (``config.model.lora``).

  Attributes:
    rank: adapter rank r (>= 1).
    alpha: scale numerator; the adapter output is multiplied by alpha / rank.
    targets: projections that get an adapter (a subset of ``TARGETS``).
    gated: multiply the adapter output by the MASK gate (1 on MASK tokens, 0 elsewhere).
    mask_id: the MASK token id the gate is computed from (needed when gated).
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  gated: bool = True
  mask_id: int = -1

  def __post_init__(self):
    # A fractional rank would pass the check below and fail as a shape far away.
    if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
      raise ValueError(f"model.lora.rank must be an integer, got {self.rank!r}")
    if self.rank < 1:
      raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
    # B starts at zero, but 0 * NaN (or inf) is NaN: a non-finite alpha gives NaN
    # outputs at step 0, and alpha = 0 silences every adapter (nothing would train).
    # None or a string raised a bare TypeError from math.isfinite naming no field, and
    # True passed as alpha = 1.
    if (isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real)
        or not (math.isfinite(self.alpha) and self.alpha != 0)):
      raise ValueError(f"model.lora.alpha must be finite and nonzero, got {self.alpha!r}")
    # A string iterates as characters: "qv" passed as ("q", "v") (and ``has`` matched
    # substrings), "up" was refused as if it were no target.
    if isinstance(self.targets, str):
      raise ValueError(f"model.lora.targets must be a tuple of names from {TARGETS}, not "
                       f"the string {self.targets!r}, which would be read as its characters")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets:
      raise ValueError(f"model.lora.targets must be a non-empty subset of {TARGETS}, "
                       f"got {self.targets!r}")
    # A fractional id was accepted and the gate (tokens == mask_id) never opened; None
    # raised a bare TypeError.
    if self.gated and (isinstance(self.mask_id, bool)
                       or not isinstance(self.mask_id, numbers.Integral)):
      raise ValueError(f"model.lora.mask_id must be an integer token id, got {self.mask_id!r}")
    if self.gated and self.mask_id < 0:
      raise ValueError("model.lora.gated needs model.lora.mask_id >= 0 (the MASK token id), "
                       f"got {self.mask_id}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def has(self, target: str) -> bool:
    return target in self.targets


def lora_gate(tokens: Array, cfg: LoraConfig | None) -> Array | None:
  """Per-token adapter gate [B, T] (float32): MASK tokens 1, others 0; all ones ungated."""
  if cfg is None:
    return None
  if not cfg.gated:
    return jnp.ones(tokens.shape, jnp.float32)
  return (tokens == cfg.mask_id).astype(jnp.float32)


def check_mask_id(cfg: LoraConfig | None, mask_id: int | None, source: str) -> None:
  """Raises unless gated adapters gate on the tokenizer's MASK id ``mask_id``.

  A wrong id (e.g. copied from another model's config) builds and trains without error,
  but the gate then never opens on MASK tokens and opens on an ordinary token instead.
  """
  if cfg is None or not cfg.gated or cfg.mask_id == mask_id:
    return
  raise ValueError(f"model.lora.mask_id={cfg.mask_id} but the MASK token of {source} is "
                   f"{mask_id}: gated LoRA would act on the wrong token; set "
                   f"model.lora.mask_id={mask_id} (or -1 with init.pretrained to take it)")


def from_config(lora) -> LoraConfig | None:
  """LoraConfig from ``config.model.lora`` (None when rank is 0 = no adapters)."""
  if lora is None or not lora.rank:
    return None
  targets = lora.targets if isinstance(lora.targets, str) else tuple(lora.targets)
  # A str is passed on as is, for LoraConfig to refuse ("qv" is not ("q", "v")).
  return LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=targets,
                    gated=lora.gated, mask_id=lora.mask_id)


def is_lora_path(path) -> bool:
  """True for a parameter path (names or jax key entries) inside a LoRA adapter."""
  names = (getattr(k, "key", getattr(k, "name", k)) for k in path)
  return any(str(n) in ("lora_a", "lora_b") for n in names)


def _folded_kernel(kernel: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
  """``kernel + scale * A B`` for kernel [S..., in..., out...], A [S..., in..., r], B [S..., r, out...].

  ``S`` are leading stacked-layer axes (``nn.scan``), found from the ranks.
  """
  stacked = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim
  if stacked < 0 or lora_a.shape[:stacked] != lora_b.shape[:stacked]:
    raise ValueError(f"LoRA shapes A {lora_a.shape}, B {lora_b.shape} do not fit kernel "
                     f"{kernel.shape}")
  lead = lora_a.shape[:stacked]
  n_in, r = math.prod(lora_a.shape[stacked:-1]), lora_a.shape[-1]
  a = lora_a.astype(jnp.float32).reshape(lead + (n_in, r))
  b = lora_b.astype(jnp.float32).reshape(lead + (r, -1))
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  sharding = getattr(kernel, "sharding", None)
  return merged if sharding is None else jax.device_put(merged, sharding)


def merge_adapters(params: Any, cfg: LoraConfig) -> Any:
  """The params with every plain adapter folded into its kernel, adapters removed.

  The result is the params of the same model built without adapters
  (``model.lora.rank = 0``), and computes the same function up to float rounding.

  Raises:
    ValueError: for gated adapters, which act only on MASK tokens, so no single
      kernel reproduces them.
  """
  if cfg.gated:
    raise ValueError("gated LoRA adapters act only on MASK tokens and cannot be folded into "
                     "the base weights; keep them (model.lora.gated=True)")

  def visit(node):
    if not isinstance(node, collections.abc.Mapping):
      return node
    out = {k: visit(v) for k, v in node.items() if k not in ("lora_a", "lora_b")}
    if "lora_a" not in node:
      return out
    owners = [k for k, v in out.items()
              if isinstance(v, collections.abc.Mapping) and "kernel" in v]
    if len(owners) != 1 or "lora_b" not in node:
      raise ValueError(f"a LoRA adapter without exactly one kernel beside it: {sorted(node)}")
    kernel_tree = out[owners[0]]
    out[owners[0]] = {**kernel_tree, "kernel": _folded_kernel(
        kernel_tree["kernel"], node["lora_a"], node["lora_b"], cfg.scale)}
    return out

  return visit(params)
