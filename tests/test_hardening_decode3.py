"""Decoder keys and stopping: raw PRNG keys, per-row key counts, EOS, early-finished rows.

The stopping cases use a scripted logits function (position p predicts a fixed token
with a logit that falls with p), so the expected canvas and NFE follow by hand from the
policy; the key cases compare decodes of the same fake models under equivalent keys.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_sampling_core import BLOCK, BOS, EOS, MASK, FakeLM, _params
from test_sampling_isd import TableLM, chain_table
from test_sampling_isd import EOS as T_EOS
from test_sampling_isd import MASK as T_MASK
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies

SAMPLE = policies.Sampling(temperature=1.0)
PROMPTS = [(BOS, 3, 4), (BOS,) + (5,) * 10, (BOS, 1) * 6]


def _block(rng, prompts=PROMPTS, sub=0):
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS, sampling=SAMPLE,
                             policy=policies.Threshold(0.5), sub_block_size=sub)
  cv = layout.generation_canvas([np.asarray(p, np.int32) for p in prompts], 13, BLOCK,
                                MASK, 40, 40)
  return decoder.decode(FakeLM(), _params(), cv, opt, rng=rng)


def _ar_isd(kind, rng, prompts=((1, 2), (5,), (0, 9, 4))):
  opt = layout.DecodeOptions(block_size=1, mask_id=T_MASK, eos_id=T_EOS, token_shift=True,
                             sampling=policies.Sampling(temperature=1.5))
  cv = layout.generation_canvas([np.asarray(p, np.int32) for p in prompts], 10, 1, T_MASK,
                                100, 16)
  if kind == "ar":
    return ar.decode_ar(TableLM(3), chain_table(), cv, opt, rng=rng)
  return isd.decode_isd(TableLM(3), chain_table(), cv, opt, 3, rng=rng)


def _decode(kind, rng, prompts=None):
  if kind == "block":
    return _block(rng) if prompts is None else _block(rng, prompts)
  return _ar_isd(kind, rng) if prompts is None else _ar_isd(kind, rng, prompts)


@pytest.mark.parametrize("kind", ["block", "ar", "isd"])
def test_a_raw_prng_key_draws_what_the_typed_key_of_its_data_draws(kind):
  """``jax.random.PRNGKey(s)`` (uint32 [2]) is one key, not two per-row keys."""
  want = _decode(kind, jax.random.key(7))
  got = _decode(kind, jax.random.PRNGKey(7))
  np.testing.assert_array_equal(got["tokens"], want["tokens"])


@pytest.mark.parametrize("kind", ["block", "ar", "isd"])
def test_a_wrong_number_of_row_keys_is_named(kind):
  with pytest.raises(ValueError, match=r"one key per row \(3 rows\).*\(4,\)"):
    _decode(kind, jax.random.split(jax.random.key(0), 4))


@dataclasses.dataclass(frozen=True)
class ScriptLM:
  """Position p of row r predicts ``script[r, p]`` (logit 6 + (S - p) / 10, else 0)."""

  kv_spec = kv_cache.KVSpec(num_layers=1, num_kv_heads=1, head_dim=2)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    script = params["script"]
    pos = jnp.clip(meta.positions, 0, script.shape[1] - 1)
    logits = jax.vmap(lambda s, p: s[p])(script, pos)
    if logits_slice is not None:
      logits = logits[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    kv = jnp.zeros(tokens.shape + (2,))[None, :, :, None]
    return logits, (kv, kv), {}


def test_eos_stops_each_row_where_a_hand_decode_stops_it():
  """EOS as the first generated token, EOS inside a sub-block, 13 new tokens (not a block
  multiple): one token per step (left to right), so NFE = tokens up to the EOS."""
  width, max_new = 32, 13
  prompts = [(BOS, 2, 3), (BOS,) + (4,) * 9, (BOS, 5)]
  eos_at = [3, 15, None]  # Row 0: its first new token; row 1: mid sub-block; row 2: none.
  script = np.zeros((3, width, 16), np.float32)
  want = np.full((3, width), MASK, np.int32)
  for r, p in enumerate(prompts):
    want[r, :len(p)] = p
    for q in range(width):
      script[r, q, EOS if q == eos_at[r] else 1 + q % 10] = 6.0 + (width - q) / 10
    for q in range(len(p), len(p) + max_new):
      want[r, q] = EOS if q == eos_at[r] else 1 + q % 10
      if q == eos_at[r]:
        break  # Nothing after the EOS is written.
  opt = layout.DecodeOptions(block_size=BLOCK, mask_id=MASK, eos_id=EOS,
                             policy=policies.LeftToRight(), sub_block_size=4)
  cv = layout.generation_canvas([np.asarray(p, np.int32) for p in prompts], max_new, BLOCK,
                                MASK, width, width)
  out = decoder.decode(ScriptLM(), {"script": jnp.asarray(script)}, cv, opt)
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["nfe"], [1, 6, 13])  # Finished rows stop counting.
  assert out["forwards"] == 13
