"""I-DLM's introspective-consistency objective (token-shifted, stride N).

The input is ``[noisy ; clean]`` (2L tokens). The clean stream is the sequence
itself with causal attention (an AR model). The noisy stream is all MASK, cut into
blocks of N: a noisy token at position i of block j attends causally inside its
block and to the clean tokens before the block (positions < jN). Token shift: the
logits at position i predict token i+1 in both streams, so the clean stream is the
base model's AR head and the noisy block proposes the tokens after the clean prefix.

    loss = CE_noisy + alpha * CE_clean

Layout through ``masks.mask_fn`` with ``MaskSpec(causal_noisy=True)`` (the model
must be built with it): clean tokens get block id = position (block size 1, so the
block-causal clean rule is causal) and noisy tokens block id = jN, so "clean
blocks strictly before the query's block" means clean positions < jN.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdiff_jax import masks

Array = Any


@dataclasses.dataclass(frozen=True)
class IntrospectiveObjective:
  """Static options of the introspective objective.

  Attributes:
    stride: noisy block length N (the ISD stride; the paper uses 4).
    mask_id: the MASK token.
    clean_weight: alpha, the weight of the clean-stream (AR) cross-entropy.
  """

  stride: int
  mask_id: int
  clean_weight: float = 0.2

  def __post_init__(self):
    if self.stride < 1:
      raise ValueError(f"diffusion.isd_stride must be >= 1, got {self.stride}")
    if self.clean_weight < 0:
      raise ValueError(f"diffusion.clean_weight must be >= 0, got {self.clean_weight}")


def training_meta(length: int, stride: int, batch: int = 1, segment_ids=None) -> masks.TokenMeta:
  """Metadata of ``[noisy ; clean]`` for the introspective layout (length 2L)."""
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  seg = jnp.zeros_like(pos) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  none = jnp.zeros(pos.shape, bool)
  noisy = masks.TokenMeta(pos, (pos // stride) * stride, jnp.full_like(pos, masks.NOISY), seg,
                          none)
  clean = masks.TokenMeta(pos, pos, jnp.full_like(pos, masks.CLEAN), seg, none)
  return noisy.concat(clean)


def per_token_ce(apply_fn: Callable, params: Any, batch: dict, obj: IntrospectiveObjective):
  """Per-position shifted cross-entropies of both streams.

  Returns:
    dict with ``noisy_nll``, ``clean_nll`` [B, L-1] (position i scored on token
    i+1), ``weight`` [B, L-1] (the target's loss mask and same document),
    ``noisy_correct``, ``clean_correct`` and the model's ``aux``.
  """
  x0 = batch["tokens"]
  b, length = x0.shape
  meta = training_meta(length, obj.stride, b, batch.get("segment_ids"))
  noisy = jnp.full_like(x0, obj.mask_id)
  logits, aux = apply_fn(params, jnp.concatenate([noisy, x0], axis=1), meta)
  vocab = jnp.arange(logits.shape[-1])
  logits = jnp.where(vocab == obj.mask_id, -jnp.inf, logits)[:, :, :]
  target = x0[:, 1:]
  weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
  if batch.get("segment_ids") is not None:
    seg = batch["segment_ids"]
    weight = weight * (seg[:, 1:] == seg[:, :-1])

  def ce(lg):
    lg = lg[:, :-1]
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(lg, -1) == target

  noisy_nll, noisy_ok = ce(logits[:, :length])
  clean_nll, clean_ok = ce(logits[:, length:])
  return dict(noisy_nll=noisy_nll, clean_nll=clean_nll, weight=weight,
              noisy_correct=noisy_ok, clean_correct=clean_ok, aux=aux)


def introspective_loss(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                       obj: IntrospectiveObjective):
  """CE_noisy + alpha * CE_clean (nats per scored token) plus the model's aux loss."""
  del rng  # Deterministic: every noisy slot is MASK.
  t = per_token_ce(apply_fn, params, batch, obj)
  n = jnp.maximum(jnp.sum(t["weight"]), 1.0)
  mean = lambda x: jnp.sum(x * t["weight"]) / n
  ce_noisy, ce_clean = mean(t["noisy_nll"]), mean(t["clean_nll"])
  loss = ce_noisy + obj.clean_weight * ce_clean
  metrics = {"ce_noisy": ce_noisy, "ce_clean": ce_clean,
             "noisy_accuracy": mean(t["noisy_correct"]),
             "clean_accuracy": mean(t["clean_correct"])}
  metrics.update(t["aux"].get("metrics", {}))
  if "aux_loss" in t["aux"]:
    loss = loss + t["aux"]["aux_loss"]
  metrics["loss"] = loss
  return loss, metrics
