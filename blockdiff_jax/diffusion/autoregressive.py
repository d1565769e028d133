"""Autoregressive SFT: plain next-token cross-entropy, the baseline a diffusion adaptation is
measured against.

Fast-dLLM v2 reports "equal quality" against an AR model fine-tuned on the same data. The
pretrained base has never seen a fine-tuning set's formats (it scores 0 on the synthetic
tasks), so the fair reference is the same base, the same data, adapters, schedule and
steps, trained with this objective instead of ``fastdllm``.

The input is the clean sequence alone (L tokens, not ``[x_t ; x_0]``), every token its own
block of the clean stream, so the block-causal clean rule of ``masks`` is causal attention,
and packed rows stay apart by their segment ids. With the token shift the output at
position i-1 predicts token i; token i is scored where ``loss_mask`` > 0 and i-1 is in the
same segment (the first token of a packed example has no predecessor of its own), and never
in padding (a negative segment id).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.diffusion import losses

Array = Any


@dataclasses.dataclass(frozen=True)
class AutoregressiveObjective:
  """Static options of the AR objective.

  Attributes:
    mask_id: the MASK token, never predicted (as in the diffusion objectives).
  """

  mask_id: int

  def __post_init__(self):
    losses.check_mask_id(self.mask_id)


def corrupt(rng: Array, batch: dict, obj: AutoregressiveObjective) -> Array:
  """No noise: an all-False [B, L] placeholder, so gradient accumulation splits it by rows."""
  del rng, obj
  return jnp.zeros(batch["tokens"].shape, bool)


def per_token_terms(apply_fn: Callable, params: Any, batch: dict, obj: AutoregressiveObjective):
  """(nll, scored, correct, aux); [B, L] entries, entry i about token i."""
  x0 = batch["tokens"]
  b, length = x0.shape
  seg = batch.get("segment_ids")
  seg = jnp.zeros_like(x0) if seg is None else jnp.asarray(seg, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  logits, aux = apply_fn(params, x0, masks.make_meta(pos, 1, masks.CLEAN, seg))
  # Entry i predicts token i from the output at i-1; entry 0 has no predecessor.
  logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
  logits = losses.subs_logits(logits, obj.mask_id)  # float32 at least, MASK never predicted
  vocab = jnp.arange(logits.shape[-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.sum(jnp.where(vocab == x0[..., None], logp, 0.0), axis=-1)
  prev_seg = jnp.concatenate([seg[:, :1] - 1, seg[:, :-1]], axis=1)
  # A negative segment is padding (``masks``: its keys are never seen, so its output
  # reads nothing): never scored, even where a loss mask of ones covers it.
  scored = (batch["loss_mask"] > 0) & (prev_seg == seg) & (seg >= 0)
  return nll, scored, jnp.argmax(logits, -1) == x0, aux


def autoregressive_loss(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                        obj: AutoregressiveObjective, corrupted: Array | None = None):
  """Mean next-token CE over the scored tokens, and metrics.

  Arguments as ``losses.block_diffusion_loss`` (``rng`` and ``corrupted`` are unused:
  nothing is random). ``nelbo`` is the CE here, so logs of every objective share a key.
  """
  del rng, corrupted
  nll, scored, correct, aux = per_token_terms(apply_fn, params, batch, obj)
  n = jnp.maximum(jnp.sum(scored), 1)
  # A select, not a product: an unscored position may hold a literal MASK id (nll = inf).
  ce = jnp.sum(jnp.where(scored, nll, 0.0)) / n
  metrics = {"nelbo": ce, "ar_ce": ce, "token_accuracy": jnp.sum(correct * scored) / n}
  metrics.update(aux.get("metrics", {}))
  loss = ce + aux["aux_loss"] if "aux_loss" in aux else ce
  metrics["loss"] = loss
  metrics[losses.LOSS_TOKENS] = jnp.sum(scored).astype(jnp.float32)  # 0 if none.
  return loss, metrics
