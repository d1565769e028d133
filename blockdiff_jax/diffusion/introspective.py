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

**Anchored blocks** (``anchors = K > 0``): instead of a noisy copy of every block, each
row gets K noisy blocks of N MASKs at random distinct anchor positions a whose first
target (token a+1) is scored; block k sits at positions a_k..a_k+N-1 and sees the clean
tokens < a_k, exactly as a block of the full layout starting at a_k would. Prompt and
padding positions, which the full layout copies and never scores, cost nothing, and
with ``detach_clean`` the model runs twice: the clean stream once without gradient
(its K/V become the noisy pass's cache), then the K*N noisy tokens with gradient. That
is exact when no trainable weight touches a clean token -- gated LoRA adapters with a
frozen base (``train.trainable=lora``) -- and then CE_clean is a constant (reported,
adds no gradient). The backward then runs over K*N tokens instead of 2L. An MoE
model's aux loss and routing metrics cover both passes, weighted by their tokens.
"""

import dataclasses
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.diffusion import losses

Array = Any


@dataclasses.dataclass(frozen=True)
class IntrospectiveObjective:
  """Static options of the introspective objective.

  Attributes:
    stride: noisy block length N (the ISD stride; the paper uses 4).
    mask_id: the MASK token.
    clean_weight: alpha, the weight of the clean-stream (AR) cross-entropy.
    anchors: K > 0: K noisy blocks per row at random scored anchors; 0: every block.
    detach_clean: (with anchors) run the clean stream without gradient; exact only when
      no trainable weight acts on clean tokens (gated LoRA, frozen base).
  """

  stride: int
  mask_id: int
  clean_weight: float = 0.2
  anchors: int = 0
  detach_clean: bool = False

  def __post_init__(self):
    # Integers only: a stride of 2.5 gave float block ids (noisy blocks at 0, 2.5, 5...
    # seeing clean tokens < 2.5) and trained silently; None failed in a bare TypeError
    # naming no field; True passed as 1.
    for name, value, low in (("isd_stride", self.stride, 1), ("isd_anchors", self.anchors, 0)):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"diffusion.{name} must be an integer >= {low}, got {value!r}")
    if isinstance(self.clean_weight, bool) or not isinstance(self.clean_weight, numbers.Real):
      raise ValueError(f"diffusion.clean_weight must be a number, got {self.clean_weight!r}")
    if not self.clean_weight >= 0:  # Also refuses NaN.
      raise ValueError(f"diffusion.clean_weight must be >= 0, got {self.clean_weight}")
    # An infinite alpha made every loss inf (NaN with no clean target to score).
    if math.isinf(self.clean_weight):
      raise ValueError(f"diffusion.clean_weight must be a finite number, "
                       f"got {self.clean_weight!r}")
    losses.check_mask_id(self.mask_id)
    if self.detach_clean and not self.anchors:
      raise ValueError("detach_clean needs anchored blocks (diffusion.isd_anchors > 0)")


def training_meta(length: int, stride: int, batch: int = 1, segment_ids=None) -> masks.TokenMeta:
  """Metadata of ``[noisy ; clean]`` for the introspective layout (length 2L)."""
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  seg = jnp.zeros_like(pos) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  none = jnp.zeros(pos.shape, bool)
  noisy = masks.TokenMeta(pos, (pos // stride) * stride, jnp.full_like(pos, masks.NOISY), seg,
                          none)
  clean = masks.TokenMeta(pos, pos, jnp.full_like(pos, masks.CLEAN), seg, none)
  return noisy.concat(clean)


def per_token_ce(apply_fn: Callable, params: Any, batch: dict, obj: IntrospectiveObjective,
                 rng: Array | None = None, corrupted: Array | None = None):
  """Per-position shifted cross-entropies of both streams.

  Returns:
    dict with ``clean_nll`` [B, L-1] (position i scored on token i+1) and its
    ``weight`` (the target's loss mask and same document); ``noisy_nll`` and
    ``noisy_weight`` ([B, L-1] for the full layout, [B, K*N] slot by slot for anchored
    blocks); ``noisy_correct``, ``clean_correct`` and the model's ``aux``.
  """
  x0 = batch["tokens"]
  b, length = x0.shape
  if obj.anchors:
    anchors = corrupt(rng, batch, obj) if corrupted is None else corrupted
    noisy_lg, noisy_target, noisy_weight, clean_lg, weight, aux = anchored_ce(
        apply_fn, params, batch, anchors, obj)
  else:
    meta = training_meta(length, obj.stride, b, batch.get("segment_ids"))
    noisy = jnp.full_like(x0, obj.mask_id)
    logits, aux = apply_fn(params, jnp.concatenate([noisy, x0], axis=1), meta)
    weight = _target_weight(batch)
    noisy_lg, clean_lg = logits[:, :length - 1], logits[:, length:-1]
    start = jnp.arange(length - 1) // obj.stride * obj.stride  # Slot i's block start.
    noisy_target = x0[:, 1:]
    noisy_weight = weight * _sees_its_document(batch, jnp.broadcast_to(start, (b, length - 1)),
                                               jnp.arange(length - 1))

  def ce(lg, target):
    lg = losses.subs_logits(lg, obj.mask_id)  # float32 at least: f16 sums overflowed.
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(lg, -1) == target

  noisy_nll, noisy_ok = ce(noisy_lg, noisy_target)
  clean_nll, clean_ok = ce(clean_lg, x0[:, 1:])
  return dict(noisy_nll=noisy_nll, clean_nll=clean_nll, weight=weight,
              noisy_weight=noisy_weight, noisy_correct=noisy_ok, clean_correct=clean_ok,
              aux=aux)


def _target_weight(batch: dict) -> Array:
  """[B, L-1] of 0/1: position i's target (token i+1) is scored and in i's document.

  Scored means ``loss_mask`` > 0, as in the other objectives: the mask's value selects
  a token, it does not weigh it (a 2.0 would count the token twice in both CEs and in
  the accumulation count). Padding (segment < 0) is never a target: two padding tokens
  share segment -1 but attend to nothing.
  """
  weight = (batch["loss_mask"][:, 1:] > 0).astype(jnp.float32)
  if batch.get("segment_ids") is not None:
    seg = batch["segment_ids"]
    weight = weight * ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0))
  return weight


def _sees_its_document(batch: dict, start: Array, at: Array) -> Array:
  """[B, n] of 0/1: a noisy block starting at ``start`` [B, n] (it sees the clean tokens
  before it) sees some of the document of position ``at`` ([n] or [B, n]).

  A block at a document's start (or starting before it: packed rows) sees nothing of
  it, a case decoding never meets (a draft always sees the prompt): its slots are not
  scored, or the drafter learned to guess from no context.
  """
  seg = batch.get("segment_ids")
  if seg is None:
    return (start > 0).astype(jnp.float32)
  seg = jnp.asarray(seg, jnp.int32)
  before = jnp.take_along_axis(seg, jnp.maximum(start - 1, 0), axis=1)
  own = jnp.take_along_axis(seg, jnp.broadcast_to(at, start.shape), axis=1)
  return ((start > 0) & (before == own)).astype(jnp.float32)


def corrupt(rng: Array, batch: dict, obj: IntrospectiveObjective) -> Array:
  """The anchors [B, K] (int32; -1 = none left in the row), or a [B] placeholder.

  Anchors are distinct positions a with a scored first target (token a+1), drawn
  uniformly without replacement (Gumbel top-K) from the whole batch's key, so rows split
  into micro-batches keep their draws.
  """
  b = batch["tokens"].shape[0]
  if not obj.anchors:
    return jnp.zeros((b,), bool)
  valid = _target_weight(batch) > 0  # [B, L-1]: anchor a valid when target a+1 scored,
  at = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
  valid &= _sees_its_document(batch, at, at) > 0  # and its block sees a's document.
  gumbel = jax.random.gumbel(rng, valid.shape)
  score, idx = jax.lax.top_k(jnp.where(valid, gumbel, -jnp.inf), obj.anchors)
  return jnp.where(jnp.isfinite(score), idx, -1).astype(jnp.int32)


def anchored_ce(apply_fn: Callable, params: Any, batch: dict, anchors: Array,
                obj: IntrospectiveObjective):
  """Per-slot CE of K anchored noisy blocks ([B, K*N]) and the clean stream ([B, L-1])."""
  x0 = batch["tokens"]
  b, length = x0.shape
  n, k = obj.stride, obj.anchors
  seg = batch.get("segment_ids")
  seg = jnp.zeros_like(x0) if seg is None else jnp.asarray(seg, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  none = jnp.zeros(pos.shape, bool)
  clean_meta = masks.TokenMeta(pos, pos, jnp.full_like(pos, masks.CLEAN), seg, none)
  clean_params = jax.lax.stop_gradient(params) if obj.detach_clean else params
  clean_logits, clean_aux = apply_fn(clean_params, x0, clean_meta, return_kv=True)
  k_cache, v_cache = clean_aux["kv"]
  if obj.detach_clean:
    k_cache, v_cache = jax.lax.stop_gradient((k_cache, v_cache))

  has = anchors >= 0
  a = jnp.maximum(anchors, 0)  # [B, K]
  slot_pos = (a[:, :, None] + jnp.arange(n, dtype=jnp.int32)).reshape(b, k * n)
  # Unused anchors get distinct negative block ids: they see only their own slots (no
  # clean key is < 0), so they neither read real text nor disturb another block.
  block_id = jnp.repeat(jnp.where(has, a, -1 - jnp.arange(k, dtype=jnp.int32)), n, axis=1)
  in_row = slot_pos < length - 1  # The slot's target (slot_pos + 1) exists.
  safe = jnp.minimum(slot_pos, length - 2)
  anchor_seg = jnp.take_along_axis(seg, jnp.repeat(a, n, axis=1), axis=1)
  # Unused anchors' slots are padding: no router statistic, no token of the aux mix.
  anchor_seg = jnp.where(jnp.repeat(has, n, axis=1), anchor_seg, -1)
  noisy_meta = masks.TokenMeta(slot_pos, block_id, jnp.full_like(slot_pos, masks.NOISY),
                               anchor_seg, jnp.zeros(slot_pos.shape, bool))
  noisy = jnp.full((b, k * n), obj.mask_id, jnp.int32)
  noisy_logits, aux = apply_fn(params, noisy, noisy_meta,
                               cache={"k": k_cache, "v": v_cache, "meta": clean_meta})
  weight = _target_weight(batch)
  target = jnp.take_along_axis(x0, safe + 1, axis=1)
  noisy_weight = (jnp.take_along_axis(weight, safe, axis=1) * in_row * jnp.repeat(has, n, 1)
                  * (jnp.take_along_axis(seg, safe + 1, axis=1) == anchor_seg)
                  * jnp.repeat(_sees_its_document(batch, a, a), n, axis=1))
  aux = _merged_aux(clean_aux, jnp.sum(seg >= 0), aux, jnp.sum(anchor_seg >= 0))
  return noisy_logits, target, noisy_weight, clean_logits[:, :-1], weight, aux


def _merged_aux(clean_aux: dict, n_clean: Array, noisy_aux: dict, n_noisy: Array) -> dict:
  """The MoE aux loss and metrics of both anchored passes, weighted by their tokens.

  The full layout routes the clean and noisy streams in one forward, so its load-balance
  and z-losses cover both; the anchored layout's two forwards must too, or the clean
  stream (most of the tokens) trains its routers with no balancing pressure and the
  logged routing metrics describe the MASK slots alone.
  """
  if "aux_loss" not in noisy_aux:
    return noisy_aux
  n_clean = n_clean.astype(jnp.float32)
  n_noisy = n_noisy.astype(jnp.float32)
  total = jnp.maximum(n_clean + n_noisy, 1.0)
  mix = lambda c, n: (n_clean * c + n_noisy * n) / total
  return {"aux_loss": mix(clean_aux["aux_loss"], noisy_aux["aux_loss"]),
          "metrics": jax.tree.map(mix, clean_aux["metrics"], noisy_aux["metrics"])}


def introspective_loss(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                       obj: IntrospectiveObjective, corrupted: Array | None = None):
  """CE_noisy + alpha * CE_clean (nats per scored token) plus the model's aux loss.

  Metrics: ``ce_noisy``, ``ce_clean``, the accuracies (``slot1_accuracy``: the first
  MASK slot's, with anchors), and ``nelbo`` = ``ce_noisy`` (the trainer's log key; not
  a bound, a plain CE of the drafts). ``rng`` draws the anchors when ``corrupted`` (from
  ``corrupt``) is not given.
  """
  t = per_token_ce(apply_fn, params, batch, obj, rng, corrupted)
  # Selects, not products: an unscored position may hold a literal MASK id (nll = inf).
  mean = lambda x, w: jnp.sum(jnp.where(w > 0, x * w, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
  ce_noisy = mean(t["noisy_nll"], t["noisy_weight"])
  ce_clean = mean(t["clean_nll"], t["weight"])
  loss = ce_noisy + obj.clean_weight * ce_clean
  metrics = {"nelbo": ce_noisy, "ce_noisy": ce_noisy, "ce_clean": ce_clean,
             "noisy_accuracy": mean(t["noisy_correct"], t["noisy_weight"]),
             "clean_accuracy": mean(t["clean_correct"], t["weight"])}
  if obj.anchors:  # Draft accuracy of the first slot: what ISD's first draft needs.
    first = t["noisy_weight"].reshape(t["noisy_weight"].shape[0], obj.anchors, obj.stride)
    ok = t["noisy_correct"].reshape(first.shape)
    metrics["slot1_accuracy"] = mean(ok[..., 0], first[..., 0])
  metrics.update(t["aux"].get("metrics", {}))
  if "aux_loss" in t["aux"]:
    loss = loss + t["aux"]["aux_loss"]
  metrics["loss"] = loss
  # Two means, two counts: accumulation weighs micro-batches by the drafts' count, so
  # CE_clean's share is exact only when clean and noisy counts are proportional.
  metrics[losses.LOSS_TOKENS] = jnp.sum(t["noisy_weight"]).astype(jnp.float32)  # 0 if none.
  return loss, metrics
