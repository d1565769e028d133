"""Training objectives. BD3-LM: the block-diffusion NELBO with the vectorized [x_t ; x_0] pass."""

import dataclasses
import numbers
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from blockdiff_jax.diffusion import corruption
from blockdiff_jax.diffusion import schedules
from blockdiff_jax import masks

Array = Any

# The metric every objective reports with the count its loss is a mean over (scored or
# masked tokens): gradient accumulation weighs each micro-batch's gradient by it, so k
# micro-batches make the update of one batch even when they score different counts.
LOSS_TOKENS = "loss_tokens"


def check_block_size(block_size: Any) -> None:
  """Refuses a ``diffusion.block_size`` that is not an integer >= 1.

  Objectives built outside the config (notebooks, experiment scripts) skip its
  validation: 0 failed in ``corrupt`` as a bare ZeroDivisionError, a negative size (it
  divides the length) as an MLIR "invalid tensor dimension size", and True passed as 1.
  """
  if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
      or block_size < 1):
    raise ValueError(f"diffusion.block_size must be an integer >= 1, got {block_size!r}")


def check_mask_id(mask_id: Any) -> None:
  """Refuses a MASK id that is not an integer >= 0 (objectives built outside the config).

  A negative id indexed the vocabulary from its end (``subs_logits`` ruled out another
  token), and a float or None reached the jitted loss as a tracer error naming nothing.
  """
  if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral) or mask_id < 0:
    raise ValueError(f"the objective's mask_id must be an integer >= 0, got {mask_id!r}")


def subs_logits(logits: Array, mask_id: int) -> Array:
  """Logits ready for the log-softmax of a loss: at least float32, MASK never predicted.

  Half-precision logits were normalized in their own dtype: in float16 the softmax sum
  of a vocabulary over 65,504 tokens overflows (every NLL inf), and in bfloat16 each NLL
  was rounded to 8 significant bits (0.03 nats off at 10 nats).

  Args:
    logits: [..., V] logits of any float dtype.
    mask_id: the MASK token (SUBS parameterization: the denoiser never predicts it).
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  # (A where, not a scatter: the vocabulary may be split over ``tensor``.)
  vocab = jnp.arange(logits.shape[-1])
  return jnp.where(vocab == mask_id, -jnp.inf, logits)


def maskable(batch: dict) -> Array:
  """[B, L] bool: positions that may be masked and scored.

  ``loss_mask`` > 0, except padding (a negative segment id): no query attends to a
  padding key (``masks``), so a masked padding token would be predicted from nothing
  and count in the NELBO's token count, even where a loss mask of ones covers it (as
  the autoregressive objective already refuses to score it).
  """
  mask = batch["loss_mask"] > 0
  seg = batch.get("segment_ids")
  if seg is not None:
    mask = mask & (jnp.asarray(seg, jnp.int32) >= 0)
  return mask


@dataclasses.dataclass(frozen=True)
class BlockDiffusionObjective:
  """Static options of the BD3-LM objective.

  Attributes:
    block_size: tokens per diffusion block (1 = autoregressive, seq_len = MDLM).
    mask_id: the MASK token.
    schedule: noise schedule (mask probability and ELBO weight of t).
    noise: clipped interval of t used for training.
    antithetic: stratify the per-block t across the batch.
  """

  block_size: int
  mask_id: int
  schedule: schedules.LogLinearSchedule = schedules.LogLinearSchedule()
  noise: schedules.NoiseRange = schedules.NoiseRange()
  antithetic: bool = True

  def __post_init__(self):
    check_block_size(self.block_size)
    check_mask_id(self.mask_id)


def corrupt(rng: Array, batch: dict, obj: BlockDiffusionObjective):
  """Draws per-block t and masks x_0. Returns (x_t, is_masked, t per token)."""
  x0 = batch["tokens"]
  b, length = x0.shape
  if length % obj.block_size:
    raise ValueError(f"sequence length {length} is not a multiple of block_size {obj.block_size}")
  rng_t, rng_m = jax.random.split(rng)
  t = schedules.sample_block_t(rng_t, b, length // obj.block_size, obj.noise, obj.antithetic)
  t_tok = corruption.block_values(t, length, obj.block_size)
  xt, is_masked = corruption.mask_tokens(rng_m, x0, obj.schedule.mask_prob(t_tok), obj.mask_id,
                                         maskable(batch))
  return xt, is_masked, t_tok


@flax.struct.dataclass
class TokenNelbo:
  """Per-token terms of the NELBO of one noise draw; callers reduce them.

  The NELBO of a token is ``nll * weight``: the training loss and validation sum it
  over the batch, the held-out likelihood per sequence.

  Attributes:
    nll: [B, L] -log p(x_0 | x_t) of every position (MASK is never predicted).
    weight: [B, L] ELBO weight of the token's t where it was masked, else 0.
    is_masked: [B, L] whether the token was masked (scored).
    correct: [B, L] whether the argmax prediction equals x_0.
    aux: the model's aux dict (``aux_loss`` and ``metrics`` of the MoE layers).
  """

  nll: Array
  weight: Array
  is_masked: Array
  correct: Array
  aux: dict


def per_token_nelbo(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                    obj: BlockDiffusionObjective,
                    corrupted: tuple | None = None) -> TokenNelbo:
  """The BD3-LM pass: corrupt x_0, run [x_t ; x_0] through the model, score x_0.

  Args:
    apply_fn: ``apply_fn(params, tokens, meta, logits_slice=...) -> (logits, aux)``;
      ``aux`` may carry a scalar ``aux_loss`` added to the training loss and a dict
      of scalar ``metrics`` (the Transformer's MoE terms).
    params: model parameters.
    batch: ``tokens`` [B, L] int32, ``loss_mask`` [B, L] (1 = may be masked and
      scored), optional ``segment_ids`` [B, L].
    rng: PRNG key for t and the masks.
    obj: objective options.
    corrupted: optional precomputed ``corrupt(rng, batch, obj)`` (so micro-batches of
      an accumulated step see exactly the noise of the full batch).
  """
  x0 = batch["tokens"]
  b, length = x0.shape
  xt, is_masked, t_tok = corrupt(rng, batch, obj) if corrupted is None else corrupted
  meta = masks.training_meta(length, obj.block_size, b, batch.get("segment_ids"))
  logits, aux = apply_fn(params, jnp.concatenate([xt, x0], axis=1), meta,
                         logits_slice=(0, length))
  # SUBS parameterization: the denoiser never predicts MASK.
  logits = subs_logits(logits, obj.mask_id)
  vocab = jnp.arange(logits.shape[-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.sum(jnp.where(vocab == x0[..., None], logp, 0.0), axis=-1)
  return TokenNelbo(nll=nll, weight=is_masked * obj.schedule.loss_weight(t_tok),
                    is_masked=is_masked, correct=jnp.argmax(logits, -1) == x0, aux=aux)


def block_diffusion_loss(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                         obj: BlockDiffusionObjective, corrupted: tuple | None = None):
  """BD3-LM training loss and metrics: ``per_token_nelbo`` summed over the batch.

  Arguments as ``per_token_nelbo``.

  Returns:
    (scalar loss, metrics dict). ``nelbo`` is in nats per scored token; the loss
    adds the model's auxiliary (MoE) loss.
  """
  terms = per_token_nelbo(apply_fn, params, batch, rng, obj, corrupted)
  nll, is_masked = terms.nll, terms.is_masked
  # A position is scored where corrupt() may mask it (loss_mask > 0, not padding); the
  # mask's value is not a weight, so a 0.5 or 2.0 mask must not rescale the NELBO.
  scored_tokens = jnp.sum(maskable(batch)).astype(jnp.float32)
  n_scored = jnp.maximum(scored_tokens, 1.0)
  # Selects, not products: a position that is not scored may hold a token the model
  # cannot predict (a literal MASK id in a prompt: nll = inf), and inf * 0 is NaN.
  nelbo = jnp.sum(jnp.where(is_masked, nll * terms.weight, 0.0)) / n_scored
  n_masked = jnp.maximum(jnp.sum(is_masked), 1)
  metrics = {
      "nelbo": nelbo,
      "masked_ce": jnp.sum(jnp.where(is_masked, nll, 0.0)) / n_masked,
      "masked_accuracy": jnp.sum(terms.correct * is_masked) / n_masked,
      "masked_fraction": jnp.sum(is_masked) / n_scored,
  }
  # The model's auxiliary loss (MoE load balance + z-loss) and its scalar metrics;
  # the objective adds them without reading any MoE statistic itself.
  metrics.update(terms.aux.get("metrics", {}))
  loss = nelbo + terms.aux["aux_loss"] if "aux_loss" in terms.aux else nelbo
  metrics["loss"] = loss
  # Gradient accumulation weighs micro-batches by it: the true count, 0 where nothing
  # is scored (n_scored is clamped only as a divisor).
  metrics[LOSS_TOKENS] = scored_tokens
  return loss, metrics
