"""The ``train`` config section and the validation of everything a training run reads."""

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


def validate_train(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``train`` field."""
  t = config.train
  if t.grad_accum_steps < 1 or config.data.batch_size % t.grad_accum_steps:
    raise ValueError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                     f"data.batch_size={config.data.batch_size}")
  for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
    if t[name] < 1:
      raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
  # 0 turns these off; a negative value would be accepted by optax and silently misbehave.
  for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay", "min_lr_ratio"):
    if not t[name] >= 0:  # Also refuses NaN.
      raise ValueError(f"train.{name} must be >= 0, got {t[name]}")
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
  if t.learning_rate <= 0:
    raise ValueError(f"train.learning_rate must be > 0, got {t.learning_rate}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Validates the sections a training run reads: diffusion, data, train, model."""
  diffusion_config.validate(config)
  data_config.validate(config)
  validate_train(config)
  model_config.validate(config)
