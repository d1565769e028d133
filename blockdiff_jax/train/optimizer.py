"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import functools
from typing import Any, Callable

import jax
import ml_collections
import optax

from blockdiff_jax.model import lora

TRAINABLE = ("all", "lora", "moe")


def warmup_steps_used(train: ml_collections.ConfigDict) -> int:
  """``train.warmup_steps``, clamped to ``steps - 1`` so the last update still decays.

  A clamp rather than an error: short runs (tests, smoke runs) keep the default warmup.
  The trainer prints a notice when it applies.
  """
  return max(0, min(train.warmup_steps, train.steps - 1))


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of the update taken at step ``s`` (0-based, the optimizer count).

  That update is the ``n = s + 1``-th, and it gets ``peak * n / warmup`` while
  ``n <= warmup`` (``warmup_steps_used``), then a cosine from the peak down to
  ``min_lr_ratio * peak`` at ``n = train.steps``. So the first update already moves
  the weights (an optax warmup from 0 would spend it at learning rate 0), the
  ``warmup``-th is at the peak and the last is at the floor (without warmup the first
  update is already one step into the cosine). The curve is a function
  of the absolute step: a resume continues it, and a resume with another
  ``train.steps`` continues the cosine of the new length from its current step.
  """
  curve = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate,
      warmup_steps=warmup_steps_used(train), decay_steps=train.steps,
      end_value=train.learning_rate * train.min_lr_ratio)
  return lambda step: curve(step + 1)


def decay_mask(params):
  """Weight decay on matrices only: norms' scales and biases are left alone.

  Neither rank alone decides: ``model.scan_layers`` stacks layers along a leading axis
  (``stack_<i>``), which makes a (layers, d) norm scale look like a matrix, and a
  q/k/v bias is (heads, head_dim).
  """
  def decays(path, p):
    if getattr(path[-1], "key", None) in ("scale", "bias"):
      return False
    stacked = any(str(getattr(k, "key", "")).startswith("stack_") for k in path)
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def _is_moe_path(path) -> bool:
  return any(getattr(k, "key", None) == "moe" for k in path)


def trainable_mask(params, trainable: str = "lora"):
  """True on the parameters that train: LoRA adapters (``train.trainable = "lora"``) or
  the MoE layers' routers and experts (``"moe"``); False on the frozen rest."""
  test = lora.is_lora_path if trainable == "lora" else _is_moe_path
  return jax.tree_util.tree_map_with_path(lambda path, _: test(path), params)


def mask_fn(trainable: str) -> Callable[[Any], Any] | None:
  """``params -> bool tree`` of ``train.trainable``; None when every weight trains."""
  if trainable not in TRAINABLE:
    raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {trainable!r}")
  return None if trainable == "all" else functools.partial(trainable_mask,
                                                           trainable=trainable)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer described by ``config.train``.

  With ``train.trainable = "lora"`` or ``"moe"`` the other weights are frozen: their
  updates are zero and the optimizer keeps no moments for them. ``"moe"`` trains only
  the MoE layers (routers and experts), e.g. a sparsely upcycled pretrained model whose
  full optimizer state does not fit in memory.
  """
  mask = mask_fn(train.get("trainable", "all"))
  if mask is not None:
    frozen = lambda params: jax.tree.map(lambda t: not t, mask(params))
    return optax.chain(optax.masked(_dense_optimizer(train), mask),
                       optax.masked(optax.set_to_zero(), frozen))
  return _dense_optimizer(train)


def _dense_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                           weight_decay=train.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
