"""Fast-dLLM v2 objective: block diffusion fine-tuning of a pretrained AR model.

The pretrained AR head is reused through a **token shift**: the output at position
i-1 predicts token i. In the vectorized ``[x_t ; x_0]`` pass with the block-diffusion
mask this means, for a target position i of block b:

* i is not the first token of its block: the prediction is the noisy stream's output
  at i-1 (same noisy block, bidirectional inside it, clean blocks < b before it);
* i is the first token of block b: the noisy stream at i-1 belongs to block b-1, so
  the prediction is the **clean** stream's output at i-1 (the last clean token
  before the block; it sees clean blocks <= b-1 only) — the AR prediction.

**Complementary masks**: every sample appears twice, with a mask m and with its
complement (1-m) over the maskable (response) tokens, so each response token is
masked, and scored, exactly once per step. Prompt and padding tokens
(``loss_mask == 0``) are never masked and never scored, nor is a token without a
predecessor of its own (a row's position 0, a packed document's first token). The
loss is the plain mean cross-entropy over the masked tokens of both copies (no 1/t
weight), as in Fast-dLLM v2's SFT recipe.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.diffusion import corruption
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules

Array = Any


@dataclasses.dataclass(frozen=True)
class FastDLLMObjective:
  """Static options of the Fast-dLLM v2 objective.

  Attributes:
    block_size: tokens per diffusion block (Fast-dLLM v2: 32).
    mask_id: the MASK token.
    schedule: gives the mask probability of the per-block noise level t.
    noise: clipped interval of t.
    antithetic: stratify the per-block t across the batch.
    complementary: also score the complementary mask of every sample.
  """

  block_size: int
  mask_id: int
  schedule: schedules.LogLinearSchedule = schedules.LogLinearSchedule()
  noise: schedules.NoiseRange = schedules.NoiseRange()
  antithetic: bool = True
  complementary: bool = True

  def __post_init__(self):
    losses.check_block_size(self.block_size)
    losses.check_mask_id(self.mask_id)


def corrupt(rng: Array, batch: dict, obj: FastDLLMObjective) -> Array:
  """Draws the primary mask m [B, L] (bool; only where ``loss_mask`` > 0).

  Only m is drawn (its complement is derived in the loss), so a batch split into
  micro-batches by rows sees exactly the noise of the whole batch.
  """
  x0 = batch["tokens"]
  b, length = x0.shape
  if length % obj.block_size:
    raise ValueError(f"sequence length {length} is not a multiple of block_size {obj.block_size}")
  rng_t, rng_m = jax.random.split(rng)
  t = schedules.sample_block_t(rng_t, b, length // obj.block_size, obj.noise, obj.antithetic)
  t_tok = corruption.block_values(t, length, obj.block_size)
  maskable = batch["loss_mask"] > 0
  _, is_masked = corruption.mask_tokens(rng_m, x0, obj.schedule.mask_prob(t_tok), obj.mask_id,
                                        maskable)
  return is_masked


def shifted_logits(logits: Array, block_size: int) -> Array:
  """Token-shifted predictions [B, L, V] from the ``[x_t ; x_0]`` logits [B, 2L, V].

  Entry i predicts token i: the noisy output at i-1 inside a block, the clean output
  at i-1 for a block's first token. Entry 0 has no predecessor; it repeats the clean
  output at 0 and must not be scored.
  """
  length = logits.shape[1] // 2
  noisy, clean = logits[:, :length], logits[:, length:]
  prev_noisy = jnp.concatenate([noisy[:, :1], noisy[:, :-1]], axis=1)
  prev_clean = jnp.concatenate([clean[:, :1], clean[:, :-1]], axis=1)
  first = (jnp.arange(length) % block_size == 0)[None, :, None]
  return jnp.where(first, prev_clean, prev_noisy)


def scorable(batch: dict) -> Array:
  """[B, L] bool: positions that may be masked and scored (each copy scores a share).

  ``losses.maskable`` (``loss_mask`` > 0, not padding), except a token without a
  predecessor of its own to predict it from: position 0, and a packed example's first
  token (the output before it is another example's).
  """
  # Not padding: two adjacent padding tokens share segment -1, yet neither attends to
  # anything.
  mask = losses.maskable(batch)
  mask = mask & (jnp.arange(mask.shape[1]) > 0)[None]
  seg = batch.get("segment_ids")
  if seg is not None:
    seg = jnp.asarray(seg, jnp.int32)
    mask = mask & (seg == jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1))
  return mask


def per_token_terms(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                    obj: FastDLLMObjective, corrupted: Array | None = None):
  """Runs both copies and returns (nll [2B, L], is_masked [2B, L], correct, aux).

  Rows [0, B) carry mask m, rows [B, 2B) its complement (when ``obj.complementary``).
  """
  # int32: uint16 token files cannot hold a MASK id appended after a 2^16 vocabulary,
  # and jnp.where would wrap it into a real token.
  x0 = jnp.asarray(batch["tokens"], jnp.int32)
  length = x0.shape[1]
  m = corrupt(rng, batch, obj) if corrupted is None else corrupted
  maskable = scorable(batch)
  seg = batch.get("segment_ids")
  seg = None if seg is None else jnp.asarray(seg, jnp.int32)
  m = m & maskable
  if obj.complementary:
    m = jnp.concatenate([m, maskable & ~m], axis=0)
    x0 = jnp.concatenate([x0, x0], axis=0)
    seg = None if seg is None else jnp.concatenate([seg, seg], axis=0)
  xt = jnp.where(m, obj.mask_id, x0)
  meta = masks.training_meta(length, obj.block_size, x0.shape[0], seg)
  logits, aux = apply_fn(params, jnp.concatenate([xt, x0], axis=1), meta)
  logits = losses.subs_logits(shifted_logits(logits, obj.block_size), obj.mask_id)
  vocab = jnp.arange(logits.shape[-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.sum(jnp.where(vocab == x0[..., None], logp, 0.0), axis=-1)
  return nll, m, jnp.argmax(logits, -1) == x0, aux


def fastdllm_loss(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                  obj: FastDLLMObjective, corrupted: Array | None = None):
  """Mean CE over masked response tokens of both copies, and metrics.

  Arguments as ``losses.block_diffusion_loss``; ``corrupted`` is ``corrupt(...)``.

  Returns:
    (scalar loss, metrics dict). ``nelbo`` here is the masked CE (nats per masked
    token) so logs of both objectives share a key.
  """
  nll, is_masked, correct, aux = per_token_terms(apply_fn, params, batch, rng, obj, corrupted)
  n_masked = jnp.maximum(jnp.sum(is_masked), 1)
  # A select, not a product: an unscored position may hold a literal MASK id (nll = inf).
  ce = jnp.sum(jnp.where(is_masked, nll, 0.0)) / n_masked
  # Positions, not weights; and only those a copy can score (not a document's first
  # token), so complementary masks give exactly 1.
  n_scorable = jnp.maximum(jnp.sum(scorable(batch)), 1)
  metrics = {
      "nelbo": ce,
      "masked_ce": ce,
      "masked_accuracy": jnp.sum(correct * is_masked) / n_masked,
      # Fraction of scorable tokens scored this step (1 with complementary masks).
      "masked_fraction": jnp.sum(is_masked) / n_scorable,
  }
  metrics.update(aux.get("metrics", {}))
  loss = ce + aux["aux_loss"] if "aux_loss" in aux else ce
  metrics["loss"] = loss
  metrics[losses.LOSS_TOKENS] = jnp.sum(is_masked).astype(jnp.float32)  # 0 if none.
  return loss, metrics
