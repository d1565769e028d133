"""Training objectives. BD3-LM: the block-diffusion NELBO with the vectorized [x_t ; x_0] pass."""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdiff_jax.diffusion import corruption
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.model import masks

Array = Any


@dataclasses.dataclass(frozen=True)
class BlockDiffusionObjective:
  """Static options of the BD3-LM objective.

  Attributes:
    block_size: tokens per diffusion block (1 = autoregressive, seq_len = MDLM).
    mask_id: the MASK token.
    schedule: noise schedule (mask probability and ELBO weight of t).
    noise: clipped interval of t used for training.
    antithetic: stratify the per-block t across the batch.
    load_balance_weight: weight of the MoE load-balance loss.
    z_loss_weight: weight of the router z-loss.
  """

  block_size: int
  mask_id: int
  schedule: schedules.LogLinearSchedule = schedules.LogLinearSchedule()
  noise: schedules.NoiseRange = schedules.NoiseRange()
  antithetic: bool = True
  load_balance_weight: float = 0.01
  z_loss_weight: float = 1e-3


def corrupt(rng: Array, batch: dict, obj: BlockDiffusionObjective):
  """Draws per-block t and masks x_0. Returns (x_t, is_masked, t per token)."""
  x0 = batch["tokens"]
  b, length = x0.shape
  if length % obj.block_size:
    raise ValueError(f"sequence length {length} is not a multiple of block_size {obj.block_size}")
  rng_t, rng_m = jax.random.split(rng)
  t = schedules.sample_block_t(rng_t, b, length // obj.block_size, obj.noise, obj.antithetic)
  t_tok = corruption.block_values(t, length, obj.block_size)
  maskable = batch["loss_mask"] > 0
  xt, is_masked = corruption.mask_tokens(rng_m, x0, obj.schedule.mask_prob(t_tok), obj.mask_id,
                                         maskable)
  return xt, is_masked, t_tok


def block_diffusion_loss(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                         obj: BlockDiffusionObjective, corrupted: tuple | None = None):
  """BD3-LM loss and metrics for one batch.

  Args:
    apply_fn: ``apply_fn(params, tokens, meta, logits_slice=...) -> (logits, aux)``.
    params: model parameters.
    batch: ``tokens`` [B, L] int32, ``loss_mask`` [B, L] (1 = may be masked and
      scored), optional ``segment_ids`` [B, L].
    rng: PRNG key for t and the masks.
    obj: objective options.
    corrupted: optional precomputed ``corrupt(rng, batch, obj)`` (so micro-batches of
      an accumulated step see exactly the noise of the full batch).

  Returns:
    (scalar loss, metrics dict). ``nelbo`` is in nats per scored token.
  """
  x0 = batch["tokens"]
  b, length = x0.shape
  xt, is_masked, t_tok = corrupt(rng, batch, obj) if corrupted is None else corrupted
  meta = masks.training_meta(length, obj.block_size, b, batch.get("segment_ids"))
  logits, aux = apply_fn(params, jnp.concatenate([xt, x0], axis=1), meta,
                         logits_slice=(0, length))
  # SUBS parameterization: the denoiser never predicts MASK.
  # (A where, not a scatter: the vocabulary may be split over ``tensor``.)
  logits = jnp.where(jnp.arange(logits.shape[-1]) == obj.mask_id, -jnp.inf, logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  vocab = jnp.arange(logits.shape[-1])
  nll = -jnp.sum(jnp.where(vocab == x0[..., None], logp, 0.0), axis=-1)
  weight = is_masked * obj.schedule.loss_weight(t_tok)
  n_scored = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
  nelbo = jnp.sum(nll * weight) / n_scored
  n_masked = jnp.maximum(jnp.sum(is_masked), 1)
  metrics = {
      "nelbo": nelbo,
      "masked_ce": jnp.sum(nll * is_masked) / n_masked,
      "masked_accuracy": jnp.sum((jnp.argmax(logits, -1) == x0) * is_masked) / n_masked,
      "masked_fraction": jnp.sum(is_masked) / n_scored,
  }
  loss = nelbo
  moe_stats = aux["moe"]
  if moe_stats:
    lb = jnp.mean(moe_stats["load_balance_loss"])
    z = jnp.mean(moe_stats["router_z_loss"])
    loss = loss + obj.load_balance_weight * lb + obj.z_loss_weight * z
    counts = moe_stats["tokens_per_expert"]
    metrics.update({
        "load_balance_loss": lb,
        "router_z_loss": z,
        "unique_experts": jnp.mean(moe_stats["unique_experts"]),
        "dropped_fraction": jnp.mean(moe_stats["dropped_fraction"]),
        # max/mean expert load: 1 = perfectly balanced.
        "expert_load_max_over_mean": jnp.mean(
            jnp.max(counts, -1) / jnp.maximum(jnp.mean(counts, -1), 1e-9)),
    })
  metrics["loss"] = loss
  return loss, metrics
