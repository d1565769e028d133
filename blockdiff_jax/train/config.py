"""The ``train`` config section and the validation of everything a training run reads."""

import json
import math
import numbers
from typing import Any

import ml_collections

from blockdiff_jax.data import config as data_config
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import config as model_config


def default_train_config() -> ml_collections.ConfigDict:
  """Defaults of the ``train`` section (AdamW, cosine decay, async checkpoints)."""
  t = ml_collections.ConfigDict()
  t.steps = 100  # Optimizer steps.
  t.learning_rate = 3e-3  # Peak learning rate.
  t.warmup_steps = 10  # Linear warmup steps.
  t.min_lr_ratio = 0.1  # Final LR of the cosine decay as a fraction of the peak.
  t.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms and biases).
  t.b1 = 0.9  # Adam beta1.
  t.b2 = 0.95  # Adam beta2.
  t.grad_clip = 1.0  # Global-norm gradient clipping; 0 = off.
  # all | lora (base weights frozen; only model.lora adapters train) | moe (only the MoE
  # layers' routers and experts train, e.g. an upcycled model).
  t.trainable = "all"
  t.ema_decay = 0.0  # EMA of parameters; 0 = off.
  t.grad_accum_steps = 1  # Micro-batches per step (batch_size must divide).
  t.log_every = 10  # Steps between metric lines.
  t.eval_every = 50  # Steps between validation NELBO evaluations; 0 = off.
  t.eval_batches = 2  # Validation batches per evaluation.
  t.checkpoint_every = 50  # Steps between checkpoints (and one at the end).
  t.keep_checkpoints = 2  # Checkpoints kept on disk.
  t.async_checkpoints = True  # Write checkpoints in the background.
  t.tensorboard = True  # Also write TensorBoard event files.
  return t


def _is_int(v: Any) -> bool:
  # numbers.Integral also takes numpy's ints (a sweep's values); True is one in python.
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate_train(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``train`` field."""
  t = config.train
  # Types first: None failed below with a bare TypeError naming no field, and a bool
  # passed as a count (ml_collections lets True into an int field: train.steps=1).
  for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches",
               "grad_accum_steps", "warmup_steps", "eval_every"):
    if not _is_int(t[name]):
      raise ValueError(f"train.{name} must be an integer, got {t[name]!r}")
  for name in ("learning_rate", "min_lr_ratio", "weight_decay", "grad_clip", "b1", "b2",
               "ema_decay"):
    if not _is_number(t[name]):
      raise ValueError(f"train.{name} must be a number, got {t[name]!r}")
  if t.grad_accum_steps < 1 or config.data.batch_size % t.grad_accum_steps:
    raise ValueError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                     f"data.batch_size={config.data.batch_size}")
  for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
    if t[name] < 1:
      raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
  # 0 turns these off; a negative value would be accepted by optax and silently misbehave.
  for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay"):
    if not t[name] >= 0:  # Also refuses NaN.
      raise ValueError(f"train.{name} must be >= 0, got {t[name]}")
  # An infinite decay sends every decayed weight to -inf * sign(w) at the first update:
  # the run then stopped on "loss or gradient is NaN/Inf", naming no field.
  if not math.isfinite(t.weight_decay):
    raise ValueError(f"train.weight_decay must be finite, got {t.weight_decay}")
  # Above 1 the cosine "decay" would raise the LR past its peak.
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
  for name in ("b1", "b2"):
    if not 0.0 <= t[name] < 1.0:
      raise ValueError(f"train.{name} must be in [0, 1), got {t[name]}")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if t.get("trainable", "all") not in ("all", "lora", "moe"):
    raise ValueError(f"train.trainable must be 'all', 'lora' or 'moe', got {t.trainable!r}")
  if t.get("trainable", "all") == "moe" and not config.model.moe.num_experts:
    raise ValueError("train.trainable='moe' needs MoE layers (model.moe.num_experts > 0)")
  if t.get("trainable", "all") == "lora" and not config.model.get("lora", {}).get("rank", 0):
    raise ValueError("train.trainable='lora' needs model.lora.rank > 0")
  if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):  # NaN fails "> 0".
    raise ValueError(f"train.learning_rate must be > 0 and finite, got {t.learning_rate}")
  # These corpora split documents by validation_fraction: at 0 the validation split is
  # empty, and the first evaluation failed after config.json and checkpoints/ existed.
  corpus, fraction = config.data.get("corpus"), config.data.get("validation_fraction")
  if t.eval_every > 0 and corpus in ("stdlib", "files", "long_context") and fraction == 0:
    raise ValueError(f"train.eval_every={t.eval_every} evaluates on the validation split, "
                     f"but data.validation_fraction=0 leaves corpus {corpus!r} none; set "
                     "data.validation_fraction > 0 or train.eval_every=0")
  # The last update is at the floor of the decay: a one-step run would train nothing.
  if t.steps == 1 and t.min_lr_ratio == 0:
    raise ValueError("train.steps=1 with train.min_lr_ratio=0.0: the only update would "
                     "have learning rate 0 (the schedule ends at the floor); set "
                     "train.min_lr_ratio > 0 or train.steps > 1")


# What a resumed run must share with the run that wrote its checkpoints: the data stream
# (the saved position indexes it), the model, the objective and the state's structure
# (train.trainable and train.ema_decay decide what the optimizer and EMA hold). All else
# may change on a resume: train.steps (extending a schedule), the LR schedule, logging,
# evaluation and checkpoint cadence, the mesh, and the sample/eval/serve sections.
FIXED_ON_RESUME = ("seed", "model", "diffusion", "data", "train.trainable",
                   "train.ema_decay")
# Fields that may change on a resume but not be turned on or off (0): that adds or removes
# a part of the optimizer state (clip_by_global_norm), so the checkpoint would not restore.
SWITCHES_FIXED_ON_RESUME = ("train.grad_clip",)
# Model fields that pick how the same function is computed (e.g. remat or bfloat16 to fit
# a new device; params stay fp32 whatever model.dtype is).
RESUMABLE_MODEL_FIELDS = ("model.remat", "model.attention_impl", "model.interpret",
                          "model.dtype", "model.moe.impl", "model.moe.tile_size",
                          "model.moe.expert_parallel")


def _under(key: str, fields: tuple[str, ...]) -> bool:
  return any(key == f or key.startswith(f + ".") for f in fields)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(node, dict):
    return {prefix: node}
  out = {}
  for key, value in node.items():
    out.update(_flat(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
  return out


def resume_changes(saved: dict, config: ml_collections.ConfigDict
                   ) -> tuple[list[str], list[str]]:
  """(refused, allowed): the fields of ``config`` that differ from a saved config.json.

  Each entry reads ``"field: old -> new"``; ``refused`` are those under
  ``FIXED_ON_RESUME`` and those of ``SWITCHES_FIXED_ON_RESUME`` turned on or off (0 is
  off). A field missing from either side is not compared: it was added (or removed) by
  a code change, not by the user.
  """
  new = json.loads(config.to_json_best_effort())  # The form save_config writes.
  old_flat, new_flat = _flat(dict(saved)), _flat(new)
  refused, allowed = [], []
  for key in sorted(old_flat.keys() & new_flat.keys()):
    if old_flat[key] != new_flat[key]:
      line = f"{key}: {old_flat[key]!r} -> {new_flat[key]!r}"
      fixed = _under(key, FIXED_ON_RESUME) and not _under(key, RESUMABLE_MODEL_FIELDS)
      if key in SWITCHES_FIXED_ON_RESUME and bool(old_flat[key]) != bool(new_flat[key]):
        fixed = True
        line += " (turned on or off: the saved optimizer state has another structure)"
      (refused if fixed else allowed).append(line)
  return refused, allowed


def validate(config: ml_collections.ConfigDict) -> None:
  """Validates the sections a training run reads: diffusion, data, train, model."""
  diffusion_config.validate(config)
  data_config.validate(config)
  validate_train(config)
  model_config.validate(config)
