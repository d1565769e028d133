"""Introspective strided decoding (ISD) against AR decoding of the same token-shifted model.

Lossless means: greedy ISD emits exactly greedy AR's tokens, and sampled ISD has AR
sampling's output distribution. A fake "table LM" makes both checkable: its logits at a
real token t are ``table[0, t]`` (a bigram model), and at a MASK they are
``table[d, t]`` of the last real token t, d positions back -- so MASK slots propose
drafts, right or wrong as the table says, while clean positions are a plain AR model.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import link_smollm2
from conftest import load_config_file
from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample

CHAIN = 10  # Tokens 0..9 are text; 10 = EOS, 11 = MASK.
EOS, MASK, VOCAB = 10, 11, 12
DEPTH = 24  # Distances d the table distinguishes (longer ones use the last row).


@dataclasses.dataclass(frozen=True)
class TableLM:
  """A causal LM with token shift whose MASK slots draft from a table (see module doc).

  ``wrong_every`` > 0 makes the MASK prediction at positions divisible by it wrong,
  so drafts are partly accepted. ``params["table"]`` is [depth, vocab, vocab]; another
  vocabulary (the byte one of test_hardening_isd2) passes its own ``mask_id``.
  """

  wrong_every: int = 0
  mask_id: int = MASK
  kv_spec = kv_cache.KVSpec(num_layers=1, num_kv_heads=1, head_dim=2)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    real = tokens != self.mask_id
    kv = jnp.stack([tokens, real], -1).astype(jnp.float32)  # [B, T, 2]
    keys, key_meta = kv, meta
    if cache is not None:
      keys = jnp.concatenate([cache["k"][0, :, :, 0], kv], 1)
      key_meta = cache["meta"].concat(meta)
    usable = masks.dense_mask(meta, key_meta) & (keys[..., 1] > 0)[:, None, :]
    kpos = jnp.where(usable, key_meta.positions[:, None, :], -1)
    idx = jnp.argmax(kpos, axis=-1)
    last = jnp.take_along_axis(keys[..., 0], idx, axis=1).astype(jnp.int32)
    d = jnp.clip(meta.positions - jnp.max(kpos, axis=-1), 0, params["table"].shape[0] - 1)
    logits = params["table"][d, last]
    if self.wrong_every:
      off = (~real) & (meta.positions % self.wrong_every == 0)
      logits = jnp.where(off[..., None], jnp.roll(logits, 1, axis=-1), logits)
    if logits_slice is not None:
      logits = logits[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    return logits, (kv[None, :, :, None], kv[None, :, :, None]), {}


def chain_table():
  """table[d, t] peaks at f^(d+1)(t), f(t) = 3t + 1 mod 10: MASK slots draft the chain."""
  table = np.zeros((DEPTH, VOCAB, VOCAB), np.float32)
  for t in range(VOCAB):
    x = t % CHAIN
    for d in range(DEPTH):
      x = (3 * x + 1) % CHAIN
      table[d, t, x] = 8.0
  table[0, 7, EOS] = 9.0  # Text reaching 7 ends.
  return {"table": jnp.asarray(table)}


def _canvas(prompts, max_new, width=None):
  return layout.generation_canvas([np.asarray(p, np.int32) for p in prompts], max_new, 1,
                                  MASK, 10_000, width)


def _options(**kw):
  return layout.DecodeOptions(block_size=1, mask_id=MASK, eos_id=EOS, token_shift=True, **kw)


PROMPTS = [(1, 2), (5,), (3, 3, 3, 3, 3, 8), (0, 9, 4)]


# Strides: the smallest, an odd one and a wide one.
@pytest.mark.parametrize("stride", [2, 3, 8])
@pytest.mark.parametrize("wrong_every", [0, 3, 5])
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_greedy_isd_equals_greedy_ar(stride, wrong_every, stop_at_eos):
  fn, params = TableLM(wrong_every), chain_table()
  opts = _options(stop_at_eos=stop_at_eos)
  canvas = _canvas(PROMPTS, 20)
  want = ar.decode_ar(fn, params, canvas, opts)
  got = isd.decode_isd(fn, params, canvas, opts, stride)
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  gen = (want["tokens"] != MASK) & canvas.maskable
  n_tokens = gen.sum(1)
  # Every forward emits accepted + 1 tokens, except at a row's end (EOS / length cut).
  assert (got["nfe"] <= n_tokens).all() and (got["nfe"] >= 1).all()
  if wrong_every == 0:
    # Perfect drafts (rows that never reach EOS, which the MASK table does not foresee):
    # after the cold prefill every forward emits `stride` tokens.
    need = 1 + np.ceil(np.maximum(n_tokens - 1, 0) / stride).astype(int)
    clean = ~((want["tokens"] == EOS) & canvas.maskable).any(1)
    assert clean.sum() == 3
    np.testing.assert_array_equal(got["nfe"][clean], need[clean])
    if stride >= 4 and not stop_at_eos:
      assert got["nfe"].sum() * 2.5 < want["nfe"].sum()


def test_rows_advance_independently():
  # One row drafts perfectly, the other never: each keeps its own pace in one batch.
  fn, params = TableLM(wrong_every=1), chain_table()
  opts = _options(stop_at_eos=False)
  got = isd.decode_isd(fn, params, _canvas([(1,), (2, 4)], 12), opts, 4)
  alone = [isd.decode_isd(fn, params, _canvas([p], 12), opts, 4) for p in [(1,), (2, 4)]]
  for i in range(2):
    np.testing.assert_array_equal(got["tokens"][i, :alone[i]["tokens"].shape[1]],
                                  alone[i]["tokens"][0])
    assert got["nfe"][i] == alone[i]["nfe"][0]


def test_rejected_drafts_never_enter_the_cache():
  # A wrong draft in the cache would change later verifier logits; the output would
  # then differ from AR. Wrong drafts at every third position stress exactly that.
  fn, params = TableLM(wrong_every=3), chain_table()
  opts = _options(stop_at_eos=False)
  canvas = _canvas(PROMPTS, 30)
  got = isd.decode_isd(fn, params, canvas, opts, 5)
  np.testing.assert_array_equal(got["tokens"], ar.decode_ar(fn, params, canvas, opts)["tokens"])
  assert (got["accepted"] > 0).all() and (got["nfe"] < 30).all()


@dataclasses.dataclass(frozen=True)
class WidthLoggingLM(TableLM):
  """TableLM that reports the width of every forward to the host (``widths``)."""

  widths: list = dataclasses.field(default_factory=list, compare=False, hash=False)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    if cache is not None:  # Loop forwards, not the prefill.
      jax.debug.callback(lambda: self.widths.append(tokens.shape[1]))
    return super().__call__(params, tokens, meta, cache, logits_slice)


@pytest.mark.parametrize("stride", [2, 3, 5])
@pytest.mark.parametrize("wrong_every,prompts", [(0, [(1,)]), (1, [(1,)]), (3, [(1,)]),
                                                 (3, PROMPTS[:2]), (1, [(1,), (2, 4)])])
def test_forwards_without_drafts_run_only_n_slots(stride, wrong_every, prompts):
  """After a rejection a row starts cold; when every running row is cold, the forward
  runs its first N slots only. Same tokens as AR either way."""
  fn, params = WidthLoggingLM(wrong_every), chain_table()
  opts = _options(stop_at_eos=False)
  canvas = _canvas(prompts, 16)
  got = jax.block_until_ready(isd.decode_isd(fn, params, canvas, opts, stride))
  jax.effects_barrier()
  widths = np.asarray(fn.widths)
  np.testing.assert_array_equal(got["tokens"], ar.decode_ar(fn, params, canvas, opts)["tokens"])
  assert len(widths) == got["forwards"] - 1 and set(widths) <= {stride, 2 * stride - 1}
  assert (widths == stride).sum() == got["narrow_forwards"]
  if wrong_every == 0:  # Perfect drafts: never cold after the prefill.
    assert got["narrow_forwards"] == 0
  if wrong_every == 1:  # Every draft is wrong: warm and cold forwards alternate.
    assert got["narrow_forwards"] >= (got["forwards"] - 2) // 2
  # narrow_window=False: every forward runs 2N-1 slots, with the same tokens and forwards.
  fn.widths.clear()
  wide = isd.decode_isd(fn, params, canvas, dataclasses.replace(opts, narrow_window=False),
                        stride)
  jax.effects_barrier()
  assert set(fn.widths) <= {2 * stride - 1} and wide["narrow_forwards"] == 0
  np.testing.assert_array_equal(wide["tokens"], got["tokens"])
  np.testing.assert_array_equal(wide["nfe"], got["nfe"])


def _exact_ar_joint(table, prompt_last, n, vocab_real):
  """P(x_1..x_n) of AR sampling at temperature 1 (MASK excluded; EOS is a token here)."""
  def cond(t):
    logits = np.array(table[0, t], np.float64)
    logits[MASK] = -np.inf
    p = np.exp(logits - logits.max())
    return p / p.sum()
  joint = {}
  for seq in itertools.product(range(vocab_real), repeat=n):
    prob, prev = 1.0, prompt_last
    for x in seq:
      prob *= cond(prev)[x]
      prev = x
    joint[seq] = prob
  return joint


def test_sampled_isd_has_the_ar_distribution():
  """TV distance between ISD's empirical joint of 3 tokens and AR's exact joint.

  8,000 rows over 4^3 = 64 outcomes: the sampling noise alone gives a TV around 0.035,
  so the tolerance is 0.07. Drafting from q and accepting every draft (skipping the
  acceptance test) would give a joint at TV > 0.25 from AR's here (checked below), so
  the test has the power to catch a wrong acceptance rule.
  """
  real = 4
  rng = np.random.default_rng(0)
  table = np.full((DEPTH, VOCAB, VOCAB), -30.0, np.float32)
  table[:, :, :real] = rng.normal(0, 1.5, (DEPTH, VOCAB, real))
  params = {"table": jnp.asarray(table)}
  opts = _options(stop_at_eos=False, sampling=policies.Sampling(temperature=1.0))
  rows, n = 8000, 3
  canvas = _canvas([(2,)] * rows, n)
  out = isd.decode_isd(TableLM(), params, canvas, opts, 3, jax.random.key(1))
  gen = out["tokens"][:, 1:1 + n]
  counts = {}
  for seq in map(tuple, gen.tolist()):
    counts[seq] = counts.get(seq, 0) + 1
  exact = _exact_ar_joint(table, 2, n, real)
  tv = 0.5 * sum(abs(counts.get(s, 0) / rows - p) for s, p in exact.items())
  tv += 0.5 * sum(c / rows for s, c in counts.items() if s not in exact)
  assert tv < 0.07, tv
  assert (out["accepted"] > 0).mean() > 0.3  # Drafts were really verified, not all cold.
  # Power: the joint if drafts 2..3 were taken from the MASK table unverified.
  def p_of(row):
    x = np.exp(row[:real] - row[:real].max())
    return x / x.sum()
  wrong = 0.0
  for s, p in exact.items():
    # The prefill's MASK slots at positions 1, 2 see the prompt token 2, d = 1 and 2 back.
    q = p_of(table[0, 2])[s[0]] * p_of(table[1, 2])[s[1]] * p_of(table[2, 2])[s[2]]
    wrong += 0.5 * abs(q - p)
  assert wrong > 0.25, wrong


def _tiny_shift_model(seed=0):
  c = config_lib.base_config()
  c.model.moe.num_experts = 0
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 32, 2, 1, 16
  model, tok = build.build_model(c)
  return model, tok, build.init_params(model, seed)


@pytest.mark.parametrize("stride", [2, 3, 8])
def test_transformer_greedy_isd_equals_ar(stride):
  model, tok, params = _tiny_shift_model()
  opts = layout.DecodeOptions(block_size=1, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True, stop_at_eos=False)
  prompts = [tok.encode(t) for t in ("hello world", "ab", "def f(x):\n  return")]
  canvas = layout.generation_canvas(prompts, 16, 1, tok.mask_id, 1000)
  want = ar.decode_ar(model, params, canvas, opts)
  got = isd.decode_isd(model, params, canvas, opts, stride)
  np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_isd_refuses_a_model_without_token_shift():
  with pytest.raises(ValueError, match="token-shifted"):
    isd.decode_isd(TableLM(), chain_table(), _canvas([(1,)], 4),
                   layout.DecodeOptions(block_size=1, mask_id=MASK, eos_id=EOS), 4)
  with pytest.raises(ValueError, match="isd_stride"):
    isd.decode_isd(TableLM(), chain_table(), _canvas([(1,)], 4), _options(), 1)


def test_smollm2_isd_is_lossless(tmp_path, smollm2_cache):
  # The bundled model before any adaptation: its MASK slots draft poorly, but the text
  # is SmolLM2's own greedy answer, token for token.
  c = load_config_file("smollm2")
  c.sample.prompts = c.sample.prompts.split(";")[0]
  c.sample.max_new_tokens = 10
  c.sample.stream = False
  link_smollm2(smollm2_cache, tmp_path)
  want = sample.run(c, str(tmp_path))[0]
  c.sample.policy = "isd"
  got = sample.run(c, str(tmp_path))[0]
  assert got["completion"] == want["completion"] and "Paris" in got["completion"]
  assert got["nfe"] <= want["nfe"]
