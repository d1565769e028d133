"""Held-out likelihood: the block-diffusion NELBO with its standard error, and bits per byte.

Every sequence gets ``num_samples`` independent noise draws over the full interval
t in [eps, 1] (training may clip t; evaluation must not, or it is no bound). Draws are
antithetic across the blocks and sequences of a batch. A sequence's estimate is the
mean over its draws of its summed NELBO (nats) and its scored-token count. The reported
NELBO is per scored token of the whole split, sum(nats) / sum(scored tokens), the one
the training loop's validation NELBO reports. Bits/byte is sum(nats) over the bytes of
the scored text: scored specials (EOS, SFT padding) cost bits but hold no byte, and
bytes/token is a split-wide ratio over text tokens. Sequences with no scored token
(padding rows) are left out, and so are rows past the end of a finite split (repeats of
its rows, which would count as more sequences). Its standard error is the ratio
estimator's (delta method) over sequences, which for sequences of equal scored length is
their per-token NELBOs' standard deviation / sqrt(number of sequences); NaN with a single
sequence.

With block_size = 1 every block is one token whose prediction does not depend on t,
so the NELBO's expectation is exactly the autoregressive NLL (tested).
"""

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax import masks
from blockdiff_jax import metrics_writer

Array = Any


def per_sequence_sums(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                      obj: losses.BlockDiffusionObjective) -> tuple[Array, Array]:
  """(summed NELBO in nats [B], scored tokens [B]) of each sequence for one noise draw.

  Sums rather than ratios, so that a caller can weight sequences by their scored
  tokens (a per-token mean over a split) and drop rows that score nothing. ``loss_mask``
  selects, it does not weigh: a position with any value > 0 may be masked and counts
  once, as in ``losses.corrupt``, so numerator and count agree for any mask values.
  """
  terms = losses.per_token_nelbo(apply_fn, params, batch, rng, obj)
  # A select, not a product: an unscored position may hold nll = inf.
  weighted = jnp.where(terms.is_masked, terms.nll * terms.weight, 0.0)
  scored = jnp.sum(losses.maskable(batch).astype(jnp.float32), -1)  # As corrupt() counts.
  return jnp.sum(weighted, -1), scored


def per_sequence_nelbo(apply_fn: Callable, params: Any, batch: dict, rng: Array,
                       obj: losses.BlockDiffusionObjective) -> Array:
  """NELBO in nats per scored token of each sequence, [B], for one noise draw.

  A row with no scored token gives 0 (it has no NELBO; ``evaluate`` leaves it out).
  """
  nats, scored = per_sequence_sums(apply_fn, params, batch, rng, obj)
  return nats / jnp.maximum(scored, 1.0)


def evaluation_objective(obj: losses.BlockDiffusionObjective) -> losses.BlockDiffusionObjective:
  """The objective with t over the whole [eps, 1] interval (an unbiased NELBO).

  Raises:
    ValueError: for an objective that is not a NELBO (Fast-dLLM v2's masked CE).
  """
  if not isinstance(obj, losses.BlockDiffusionObjective):
    raise ValueError(f"the likelihood task needs the BD3-LM NELBO; {type(obj).__name__} "
                     "(diffusion.objective) is not a likelihood bound")
  return dataclasses.replace(obj, noise=schedules.NoiseRange(obj.schedule.eps, 1.0),
                             antithetic=True)


def evaluate(apply_fn: Callable, params: Any, dataset, obj: losses.BlockDiffusionObjective,
             num_batches: int, num_samples: int, seed: int = 0,
             bytes_per_token: float | None = None, progress: TextIO | None = None,
             special_ids: Sequence[int] | None = None) -> dict:
  """NELBO (nats/token), its standard error and bits/byte over ``num_batches`` batches.

  Args:
    num_batches: batches to read at most. A finite split (``distinct_rows``) is read
      up to its last row only: rows past it repeat earlier ones, and counting a row
      twice as two sequences understates the standard error.
    bytes_per_token: UTF-8 bytes per text (non-special) token, a finite number > 0;
      default the dataset's (no bits/byte where it is not such a number).
    progress: a stream for lines with rate and ETA (None: silent).
    special_ids: the tokenizer's special ids. Scored specials (EOS, SFT padding) are
      text of no bytes: bits/byte divides all the scored bits by the bytes of the
      scored text tokens only (``bytes_per_token`` is per text token). None: every
      scored token is text.

  Returns:
    ``nelbo`` (nats per scored token, token-weighted over the split), ``nelbo_stderr``,
    ``sequences`` (rows with at least one scored token), ``scored_tokens``,
    ``text_tokens`` (scored, not special), ``noise_samples`` and, when bytes per token
    is known, ``bits_per_byte`` and its standard error.

  Raises:
    ValueError: if ``num_batches`` or ``num_samples`` is < 1, ``bytes_per_token`` is
      given but not a finite number > 0, or no row of the batches has a scored token.
  """
  # Before any batch is read: with none, numpy would fail later with "need at least
  # one array", naming neither argument.
  for name, value in (("num_batches", num_batches), ("num_samples", num_samples)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"likelihood.evaluate: {name} must be an integer >= 1, got {value!r}")
  # Before the forwards: 0 would silently drop bits/byte, a negative or NaN value
  # would report a negative or NaN one.
  if bytes_per_token is not None and not _positive_number(bytes_per_token):
    raise ValueError("likelihood.evaluate: bytes_per_token must be a finite number > 0 "
                     f"(None: the dataset's), got {bytes_per_token!r}")
  obj = evaluation_objective(obj)
  fn = jax.jit(lambda p, batch, rng: per_sequence_sums(apply_fn, p, batch, rng, obj))
  nats, scored, text = [], [], []
  distinct = distinct_rows(dataset)
  meter = metrics_writer.Progress(num_batches, unit="batches", stream=progress,
                                  label="likelihood", interval_s=30.0)
  row = 0  # Global index of the batch's first row.
  for i in range(num_batches):
    if distinct is not None and row >= distinct:
      # Every row of the split is measured: the rest would be repeats, counted as more
      # sequences (a smaller standard error than the split supports).
      if progress is not None:
        print(f"likelihood: the split has {distinct} rows, all measured after {i} of "
              f"{num_batches} batches; the rest would repeat them", file=progress)
      break
    batch = dataset.get_batch(i)
    draws = [fn(params, batch, jax.random.fold_in(jax.random.key(seed), i * num_samples + s))
             for s in range(num_samples)]
    # list(): a set (or any iterable) of ids, where np.asarray made a 0-d object array.
    special = np.isin(np.asarray(batch["tokens"]), np.asarray(
        [] if special_ids is None else list(special_ids), np.int64))
    rows = len(special) if distinct is None else min(len(special), distinct - row)
    row += len(special)
    nats.append(np.mean(np.stack([np.asarray(d[0], np.float64) for d in draws]), axis=0)[:rows])
    scored.append(np.asarray(draws[0][1], np.float64)[:rows])  # The same for every draw.
    text.append(np.sum(np.asarray(losses.maskable(batch)) & ~special, -1,
                       dtype=np.float64)[:rows])
    meter.update()
  nats, scored, text = np.concatenate(nats), np.concatenate(scored), np.concatenate(text)
  # Padding rows score nothing: counting them as sequences with 0 nats would pull the
  # NELBO towards 0 and shrink its standard error.
  keep = scored > 0
  if not np.any(keep):
    raise ValueError("likelihood.evaluate: no scored token in the evaluated batches "
                     "(every loss_mask is 0)")
  nats, scored, text = nats[keep], scored[keep], text[keep]
  nelbo, stderr = _ratio(nats, scored)
  out = {"nelbo": nelbo, "nelbo_stderr": stderr, "sequences": len(nats),
         "scored_tokens": int(scored.sum()), "text_tokens": int(text.sum()),
         "noise_samples": num_samples}
  bpt = bytes_per_token if bytes_per_token is not None else getattr(dataset, "bytes_per_token",
                                                                    None)
  # A dataset without a usable ratio (no bytes measured: 0 or NaN) gives no bits/byte.
  if _positive_number(bpt) and text.sum() > 0:
    per_text, per_text_stderr = _ratio(nats, text)
    out["bits_per_byte"] = per_text / math.log(2) / bpt
    out["bits_per_byte_stderr"] = per_text_stderr / math.log(2) / bpt
  return out


def _positive_number(value: Any) -> bool:
  """Whether ``value`` is a finite real number > 0 (not a bool)."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def distinct_rows(dataset: Any) -> int | None:
  """Rows of a finite split (None: an endless stream such as the synthetic tasks).

  A finite split's rows ``[0, n)`` hold each of its ``n`` rows once (every epoch is a
  permutation of them); later rows repeat them.
  """
  for name in ("num_windows", "num_rows", "num_examples"):
    n = getattr(dataset, name, None)
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0:
      return int(n)
  return None


def _ratio(nats: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
  """sum(nats) / sum(tokens) over sequences, and its ratio-estimator standard error."""
  m = len(nats)
  ratio = float(nats.sum() / tokens.sum())
  # Delta method: residuals of each sequence's nats against ratio x its tokens.
  resid = nats - ratio * tokens
  # One sequence has no spread to estimate it from: the error is unknown (NaN, null in
  # the JSON), not 0, which would read as an exact NELBO.
  stderr = (float(math.sqrt(np.sum(resid ** 2) / (m - 1) / m) / tokens.mean())
            if m > 1 else float("nan"))
  return ratio, stderr


def autoregressive_nll(apply_fn: Callable, params: Any, tokens: Array, mask_id: int) -> Array:
  """Exact AR NLL per token [B, L] by predicting each token from its clean prefix.

  An independent path for tests: for each i the input holds the clean tokens < i, a
  single MASK at i in its own noisy block (block size 1), and empty slots after it
  (negative segment ids), without the vectorized [x_t ; x_0] layout.
  """
  b, length = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))

  @jax.jit
  def nll_at(i):
    stream = jnp.where(pos == i, masks.NOISY, masks.CLEAN)
    segments = jnp.where(pos <= i, 0, -1)
    meta = masks.make_meta(pos, 1, stream, segments)
    inp = jnp.where(pos == i, mask_id, jnp.where(pos < i, tokens, 0))
    logits, _ = apply_fn(params, inp, meta)
    logits = logits[:, i].at[:, mask_id].set(-jnp.inf)
    return -jax.nn.log_softmax(logits)[jnp.arange(b), tokens[:, i]]

  return jnp.stack([nll_at(i) for i in range(length)], 1)
