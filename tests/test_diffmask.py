"""Masks and diffusion losses against brute-force references built from their docstrings."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules


# --- The mask of arbitrary metadata against the rules of the masks docstring. ---


def _reference_pair(q, k, causal_noisy, causal_clean, window):
  """Whether query q sees key k; q, k = (position, block, stream, segment, summary)."""
  (qp, qb, qs, qg, qsum), (kp, kb, ks, kg, ksum) = q, k
  if kg < 0 or qg != kg:
    return False
  if ks == masks.NOISY:  # Only a noisy query of the same block sees a noisy key.
    return qs == masks.NOISY and qb == kb and (not causal_noisy or kp <= qp)
  if qsum:  # A summary slot: the clean tokens and slots of its own block.
    return kb == qb
  limit = qb - 1 if qs == masks.NOISY else qb
  if ksum:  # Slots of blocks older than the window, only with a window.
    return window > 0 and kb < qb - window and kb <= limit
  if kb > limit or (kb == qb and causal_clean and kp > qp):
    return False
  return window == 0 or kb >= qb - window


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_of_random_metadata_matches_the_docstring_rules(seed):
  """Mixed streams, segments with padding, summary slots, a block size that need not
  divide the positions, every MaskSpec: one brute-force pair loop each."""
  rng = np.random.default_rng(seed)
  n = 24
  pos = rng.integers(0, 10, n)
  block = int(rng.integers(1, 4))
  stream = rng.integers(0, 2, n)
  seg = rng.integers(-1, 2, n)
  summ = (stream == masks.CLEAN) & (rng.random(n) < 0.3)
  meta = masks.TokenMeta(*(jnp.asarray(x)[None] for x in
                           (pos, pos // block, stream, seg, summ)))
  rows = list(zip(pos, pos // block, stream, seg, summ))
  for cn, cc, w in itertools.product([False, True], [False, True], [0, 2]):
    got = np.asarray(masks.dense_mask(meta, meta, masks.MaskSpec(cn, cc, w))[0])
    want = np.array([[_reference_pair(q, k, cn, cc, w) for k in rows] for q in rows])
    np.testing.assert_array_equal(got, want, err_msg=f"causal {cn},{cc} window {w}")


# --- Static sizes: refused by name, not silently turned into a wrong mask. ---


@pytest.mark.parametrize("block_size", [0, -2, 2.5, True])
def test_make_meta_refuses_a_block_size_that_is_not_a_positive_integer(block_size):
  # Before: 0 gave block ids -1, -2, ... (XLA's integer division by zero), 2.5 float ids.
  with pytest.raises(ValueError, match=r"make_meta: block_size must be an integer >= 1"):
    masks.make_meta(jnp.arange(6)[None], block_size, masks.CLEAN)


def test_make_meta_accepts_numpy_integers():
  meta = masks.make_meta(jnp.arange(6)[None], np.int64(4), masks.CLEAN)
  np.testing.assert_array_equal(meta.block_ids, [[0, 0, 0, 0, 1, 1]])


@pytest.mark.parametrize("window", [1.5, "2", True])
def test_mask_spec_refuses_a_window_that_is_not_a_nonnegative_integer(window):
  # Before: 1.5 acted as 1, True as 1, and "2" failed in a bare TypeError.
  with pytest.raises(ValueError, match=r"MaskSpec: window_blocks must be an integer >= 0"):
    masks.MaskSpec(window_blocks=window)


@pytest.mark.parametrize("block_size,num_slots", [(4.0, 1), (4, 2.0), (True, 1)])
def test_summary_slots_meta_refuses_non_integer_sizes(block_size, num_slots):
  # Before: floats failed deep in slicing / jnp.repeat (TypeError), True passed as 1.
  clean = masks.make_meta(jnp.arange(8)[None], 4, masks.CLEAN)
  with pytest.raises(ValueError, match=r"summary_slots_meta: \w+ must be an integer >= 1"):
    masks.summary_slots_meta(clean, block_size, num_slots)


# --- Losses: half-precision logits are scored in float32. ---

VOCAB = 70_000  # Over float16's largest finite value, 65,504.
MASK = VOCAB - 1


def _row_logits(dtype):
  """One logit row, exactly representable in ``dtype``, and its float64 copy."""
  row = ((jnp.arange(VOCAB) % 89) / 2000.0).astype(dtype)  # Flat: sum exp > 65,504.
  return row, np.asarray(row.astype(jnp.float32), np.float64)


def _fake_apply(dtype):
  """Every position outputs the same logit row, in ``dtype``."""
  row, _ = _row_logits(dtype)

  def apply_fn(params, tokens, meta, logits_slice=None):
    del params, meta
    b, t = tokens.shape
    if logits_slice is not None:
      t = logits_slice[1]
    return jnp.broadcast_to(row, (b, t, VOCAB)), {}
  return apply_fn


def _per_token_nll(objective, apply_fn, batch):
  rng = jax.random.PRNGKey(0)
  if objective == "bd3":
    obj = losses.BlockDiffusionObjective(block_size=2, mask_id=MASK)
    return losses.per_token_nelbo(apply_fn, None, batch, rng, obj).nll
  if objective == "fastdllm":
    obj = fastdllm.FastDLLMObjective(block_size=2, mask_id=MASK)
    return fastdllm.per_token_terms(apply_fn, None, batch, rng, obj)[0][:1]
  obj = autoregressive.AutoregressiveObjective(mask_id=MASK)
  return autoregressive.per_token_terms(apply_fn, None, batch, obj)[0]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("objective", ["bd3", "fastdllm", "ar"])
def test_half_precision_logits_give_the_float64_nll(objective, dtype):
  # Before: float16 gave nll = inf everywhere (the softmax sum overflowed); bfloat16
  # rounded every nll to 8 bits (0.03 nats off).
  tokens = jnp.array([[3, 500, 12_345, 69_000]], jnp.int32)
  batch = {"tokens": tokens, "loss_mask": jnp.ones((1, 4), jnp.float32)}
  nll = np.asarray(_per_token_nll(objective, _fake_apply(dtype), batch))
  _, ref = _row_logits(dtype)
  ref = ref[:MASK]  # MASK is never predicted.
  logz = ref.max() + np.log(np.sum(np.exp(ref - ref.max())))
  want = logz - ref[np.asarray(tokens[0])]
  np.testing.assert_allclose(np.asarray(nll[0], np.float64), want, rtol=1e-5)
  assert nll.dtype == np.float32


# --- Losses: padding (negative segment) is never masked nor scored. ---


def _token_apply(vocab=16):
  """Position-wise logits that depend on the input token (a masked token changes them)."""
  table = jax.random.normal(jax.random.PRNGKey(1), (vocab + 1, vocab))

  def apply_fn(params, tokens, meta, logits_slice=None):
    del params, meta
    if logits_slice is not None:
      tokens = tokens[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    return table[tokens], {}
  return apply_fn


@pytest.mark.parametrize("objective", ["bd3", "fastdllm"])
def test_padding_is_never_scored_even_under_a_loss_mask_of_ones(objective):
  """A padding key is never attended to (masks), so a masked padding token would be
  predicted from nothing: as the AR objective, its loss mask must not matter."""
  # Before: padding with loss_mask 1 was masked, scored and counted in loss_tokens.
  tokens = jnp.array([[1, 2, 3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 0, 0, 0, 0]], jnp.int32)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, -1, -1], [0, 0, 0, 0, -1, -1, -1, -1]], jnp.int32)
  ones = jnp.ones(tokens.shape, jnp.float32)
  noise = schedules.NoiseRange(beta=0.9, omega=1.0)  # Nearly every token masked.
  if objective == "bd3":
    obj = losses.BlockDiffusionObjective(block_size=2, mask_id=16, noise=noise)
    loss_fn = losses.block_diffusion_loss
  else:
    obj = fastdllm.FastDLLMObjective(block_size=2, mask_id=16, noise=noise)
    loss_fn = fastdllm.fastdllm_loss
  rng = jax.random.PRNGKey(3)
  results = [loss_fn(_token_apply(), None, {"tokens": tokens, "loss_mask": lm,
                                            "segment_ids": seg}, rng, obj)[1]
             for lm in (ones, (seg >= 0).astype(jnp.float32))]
  # Fast-dLLM: its two copies score each scorable token once, and a row's or document's
  # first token (3 here) is not scorable.
  want_tokens = 10 if objective == "bd3" else 10 - 3
  for metrics in results:
    assert float(metrics[losses.LOSS_TOKENS]) == want_tokens
  np.testing.assert_allclose(float(results[0]["loss"]), float(results[1]["loss"]),
                             rtol=1e-6)
  if objective == "bd3":
    xt, is_masked, _ = losses.corrupt(rng, {"tokens": tokens, "loss_mask": ones,
                                            "segment_ids": seg}, obj)
    assert not np.any(np.asarray(is_masked)[np.asarray(seg) < 0])
    np.testing.assert_array_equal(np.asarray(xt)[np.asarray(seg) < 0], 0)
