"""Decoding policies: which MASK positions of a block to fill at one denoising step.

A policy sees, for each row, the confidence of the token proposed at every candidate
position (a MASK position of the current block or sub-block) and returns the positions to
accept. Every policy accepts at least one candidate per step while candidates remain, so a
block always finishes in at most ``block_size`` steps.

Policies are small frozen dataclasses; ``make_policy(name, value)`` builds one from the
``sample`` config. ``Sampling`` turns logits into the proposed tokens and their
confidence (greedy, or temperature with top-k / top-p).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

_NEG = -1e30  # Finite "minus infinity": keeps sort keys and softmax NaN-free.
_MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the proposed token of a position is drawn from its logits.

  Attributes:
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: keep only the k most likely tokens before sampling; 0 = all. Tokens tied
      with the k-th largest logit are kept too (more than k may survive), as Hugging
      Face's ``TopKLogitsWarper`` does, rather than broken by token id.
    top_p: keep the smallest set of tokens whose probability reaches p; 1 = all.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    # NaN passes "< 0" and decodes token 0 with NaN confidence; inf turns a -inf logit
    # into NaN (-inf / inf) and draws that impossible token.
    if not 0 <= self.temperature < float("inf"):
      raise ValueError(f"sample.temperature must be a finite number >= 0, "
                       f"got {self.temperature}")
    if 0 < self.temperature < _MIN_TEMPERATURE:
      # XLA flushes float32 subnormals to zero: the logits would be divided by 0.
      raise ValueError(f"sample.temperature must be 0 (greedy) or >= {_MIN_TEMPERATURE:.4g} "
                       f"(the smallest normal float32), got {self.temperature}")
    if not (isinstance(self.top_k, (int, np.integer)) or float(self.top_k).is_integer()):
      # A float k (even 2.0) failed only inside the first sampled decode, as a shape error.
      raise ValueError(f"sample.top_k must be a whole number of tokens, got {self.top_k}")
    if self.top_k < 0:
      raise ValueError(f"sample.top_k must be >= 0, got {self.top_k}")
    object.__setattr__(self, "top_k", int(self.top_k))  # 2.0 -> 2: lax.top_k needs an int.
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sample.top_p must be in (0, 1], got {self.top_p}")

  def filter_logits(self, logits: Array) -> Array:
    """Applies temperature, top-k and top-p; greedy keeps the logits as they are.

    Greedy ignores top-k and top-p (as OpenAI's API does): they would not change the
    argmax, but the confidence a policy ranks by would come from the renormalised
    filtered softmax (1.0 everywhere with ``top_k=1``), so a threshold would fill whole
    blocks at once.
    """
    if self.temperature == 0:
      return logits
    # At least fp32: a bf16 softmax and cumsum put the top-p cut in the wrong place
    # (over a thousand tokens off in a 40k vocabulary) and give a mass that is not 1.
    logits = _at_least_fp32(logits)
    # Shifted so the largest finite logit is 0 (softmax and sampling are shift-invariant):
    # a tiny temperature then sends the others towards -inf instead of the top towards
    # +inf, where inf - inf would make the softmax NaN and the draw arbitrary.
    finite = jnp.where(jnp.isfinite(logits), logits, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(finite, axis=-1, keepdims=True))
    logits = (logits - jnp.where(jnp.isfinite(top), top, 0.0)) / self.temperature
    if self.top_k:
      kth = top_k_values(logits, min(self.top_k, logits.shape[-1]))[..., -1:]
      logits = jnp.where(logits < kth, _NEG, logits)
    if self.top_p < 1.0:
      order = jnp.argsort(-logits, axis=-1)
      sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
      cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
      # Keep a token if the mass before it is still below p (the top token always stays).
      keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < self.top_p
      keep = _unsort(keep_sorted, order)
      logits = jnp.where(keep, logits, _NEG)
    return logits

  def propose(self, logits: Array, rng: Array) -> tuple[Array, Array]:
    """Proposed tokens and their confidence (probability under the filtered softmax;
    greedy: under the model's own softmax).

    Args:
      logits: [..., V] logits (bf16/fp16 are computed in fp32).
      rng: PRNG key (unused when greedy).

    Returns:
      (tokens [...] int32, confidence [...] fp32, filtered probabilities [..., V]).
    """
    # fp32 confidences also for greedy: a bf16 probability rounds to steps of 1/256 near
    # 1, so a threshold policy would compare rounded values.
    logits = self.filter_logits(_at_least_fp32(logits))
    probs = jax.nn.softmax(logits, axis=-1)
    if self.temperature > 0:
      tokens = jax.random.categorical(rng, logits, axis=-1)
    else:
      tokens = jnp.argmax(logits, axis=-1)
    tokens = tokens.astype(jnp.int32)
    conf = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    return tokens, conf, probs


def _at_least_fp32(x: Array) -> Array:
  """``x`` in fp32 when its dtype is narrower (bf16/fp16 logits); fp64 stays fp64."""
  return jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def top_k_values(x: Array, k: int) -> Array:
  """The ``k`` largest values of the last axis, in descending order.

  The barrier keeps ``lax.top_k`` whole: on the CPU, XLA turns a top-k whose values are
  then sliced into a full sort of the last axis (about 90x slower over a 49k vocabulary).
  """
  return jax.lax.optimization_barrier(jax.lax.top_k(x, k))[0]


def _unsort(values_sorted: Array, order: Array) -> Array:
  """Inverse of ``take_along_axis(x, order)`` on the last axis."""
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(values_sorted, inverse, axis=-1)


def _rank_desc(score: Array, candidates: Array) -> Array:
  """0-based rank of each candidate by descending score (non-candidates rank last).

  A NaN score (NaN confidences come from NaN or +inf logits) ranks after every other
  candidate but before the non-candidates, so ``_at_least_one`` still picks a candidate.
  """
  score = jnp.where(jnp.isnan(score), 0.5 * _NEG, jnp.maximum(score, 0.5 * _NEG))
  key = jnp.where(candidates, score, _NEG)
  order = jnp.argsort(-key, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def _at_least_one(accept: Array, score: Array, candidates: Array) -> Array:
  """Adds the best candidate of a row whose acceptance set is empty."""
  best = _rank_desc(score, candidates) == 0
  empty = ~jnp.any(accept, axis=-1, keepdims=True)
  return (accept | (empty & best)) & candidates


@dataclasses.dataclass(frozen=True)
class Threshold:
  """Accept every candidate with confidence >= tau (and at least the most confident).

  ``tau = 1`` accepts exactly one token per step, the most confident candidate (ties to
  the leftmost): one token per forward in confidence order, not left to right (that is
  ``LeftToRight``).
  """

  tau: float = 0.9

  def __post_init__(self):
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f"Threshold.tau must be in [0, 1], got {self.tau}")

  def select(self, conf: Array, entropy: Array, margin: Array, candidates: Array,
             slots: Array) -> Array:
    """Positions to accept (every policy has this signature).

    Args:
      conf: [rows, n] confidence of each position's proposed token.
      entropy: [rows, n] entropy of each position's distribution.
      margin: [rows, n] top-1 minus top-2 probability.
      candidates: [rows, n] bool, the MASK positions that may be filled now.
      slots: [rows, 1] int, fillable positions of the (sub-)block (used by TopK).

    Returns:
      [rows, n] bool, a subset of ``candidates``, non-empty where candidates are.
    """
    del entropy, margin, slots
    # tau = 1 accepts exactly one token per step (the argmax rule below), even when a
    # probability rounds to 1.0 in fp32.
    accept = (conf >= self.tau) & (self.tau < 1.0)
    return _at_least_one(accept & candidates, conf, candidates)


@dataclasses.dataclass(frozen=True)
class Factor:
  """Fast-dLLM factor rule: accept the top n while c_n >= 1 - f / (n + 1).

  c_n is the n-th highest confidence (1-based), so more tokens in parallel require
  higher confidence of each.
  """

  f: float = 1.0

  def __post_init__(self):
    # "not >=" also refuses NaN, which no rule holds for: one token per step under the
    # label factor:nan. f = inf is a real setting (every candidate at once).
    if not self.f >= 0:
      raise ValueError(f"Factor.f must be >= 0, got {self.f}")

  def select(self, conf, entropy, margin, candidates, slots):
    del entropy, margin, slots
    rank = _rank_desc(conf, candidates)  # 0-based: the n-th best has rank n - 1.
    order = jnp.argsort(rank, axis=-1)
    sorted_conf = jnp.take_along_axis(jnp.where(candidates, conf, -1.0), order, axis=-1)
    n = jnp.arange(1, conf.shape[-1] + 1, dtype=conf.dtype)
    ok_sorted = sorted_conf >= 1.0 - self.f / (n + 1.0)
    # Accept the prefix of the ranking where the rule holds for every n so far.
    prefix = jnp.cumprod(ok_sorted.astype(jnp.int32), axis=-1).astype(bool)
    accept = _unsort(prefix, order)
    return _at_least_one(accept & candidates, conf, candidates)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Static schedule: k = ceil(candidates at the block start / steps) per step.

  ``steps`` is a budget per block: with sub-blocks, k is still sized by the whole
  block's candidates and each sub-block fills k per step, so a block takes ``steps``
  steps when its sub-blocks split them evenly (at least one per sub-block with work).
  """

  steps: int = 4

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"TopK.steps must be >= 1, got {self.steps}")

  def select(self, conf, entropy, margin, candidates, slots):
    del entropy, margin
    k = jnp.maximum((slots + self.steps - 1) // self.steps, 1)  # [rows, 1]
    return (_rank_desc(conf, candidates) < k) & candidates


@dataclasses.dataclass(frozen=True)
class EntropyBounded:
  """Accept in order of increasing entropy while the cumulative entropy <= gamma."""

  gamma: float = 0.5

  def __post_init__(self):
    # "not >=" also refuses NaN (no cumulative entropy is <= NaN: one token per step
    # under the label entropy:nan). gamma = inf is a real setting (no budget).
    if not self.gamma >= 0:
      raise ValueError(f"EntropyBounded.gamma must be >= 0, got {self.gamma}")

  def select(self, conf, entropy, margin, candidates, slots):
    del margin, slots
    rank = _rank_desc(-entropy, candidates)
    order = jnp.argsort(rank, axis=-1)
    sorted_h = jnp.take_along_axis(jnp.where(candidates, entropy, jnp.inf), order, axis=-1)
    accept = _unsort(jnp.cumsum(sorted_h, axis=-1) <= self.gamma, order)
    return _at_least_one(accept & candidates, -entropy, candidates)


@dataclasses.dataclass(frozen=True)
class Margin:
  """Accept candidates whose top-1 minus top-2 probability >= threshold."""

  threshold: float = 0.5

  def __post_init__(self):
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"Margin.threshold must be in [0, 1], got {self.threshold}")

  def select(self, conf, entropy, margin, candidates, slots):
    del conf, entropy, slots
    accept = margin >= self.threshold
    return _at_least_one(accept & candidates, margin, candidates)


@dataclasses.dataclass(frozen=True)
class LeftToRight:
  """Accept exactly the leftmost candidate: one token per forward, in order.

  This is autoregressive order inside the block-diffusion layout (noisy block, MASKs to
  the right), so it shows the accuracy of one-token-per-forward decoding without the
  one-token-block layout that a model trained with larger blocks never saw.
  """

  def select(self, conf, entropy, margin, candidates, slots):
    del conf, entropy, margin, slots
    return candidates & (jnp.cumsum(candidates.astype(jnp.int32), axis=-1) == 1)


Policy = Threshold | Factor | TopK | EntropyBounded | Margin | LeftToRight

POLICIES = {"threshold": Threshold, "factor": Factor, "topk": TopK,
            "entropy": EntropyBounded, "margin": Margin, "l2r": LeftToRight}


def make_policy(name: str, value: float | None = None) -> Policy:
  """Builds a policy from its config name and its one parameter (None = default).

  Args:
    name: one of ``POLICIES``: threshold (tau), factor (f), topk (steps per block),
      entropy (gamma), margin (threshold), l2r (no parameter).
    value: the policy's parameter (ignored by l2r).
  """
  if name not in POLICIES:
    raise ValueError(f"sample.policy must be one of {sorted(POLICIES)}, got {name!r}")
  cls = POLICIES[name]
  if value is None or cls is LeftToRight:
    return cls()
  if cls is TopK:
    if not float(value).is_integer():  # int() would silently change the schedule.
      raise ValueError(f"TopK.steps must be a whole number of steps, got {value}")
    return cls(int(value))
  return cls(float(value))


def scores(probs: Array) -> tuple[Array, Array]:
  """Entropy and top-1 minus top-2 margin of probabilities [..., V]."""
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
  top2 = top_k_values(probs, 2)
  return entropy, top2[..., 0] - top2[..., 1]
