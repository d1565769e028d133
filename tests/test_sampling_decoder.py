"""The jitted block decoder against slow no-cache references, on a tiny random MoE model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample

BLOCK = 8
WIDTH = 48
MAX_LEN = 64
PROMPTS = ["<|bos|>hello world, this", "<|bos|>ab"]  # 18 and 3 tokens: mid-block ends.
MAX_NEW = 20


def _options(tok, **kw):
  # tau 0.05 accepts several tokens per step on this random model, so the order in which
  # positions are filled depends on the exact logits of every step.
  kw.setdefault("policy", policies.Threshold(0.05))
  return decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id, **kw)


def _canvas(tok, prompts=PROMPTS):
  ids = [layout.parse(tok, p).ids for p in prompts]
  return layout.generation_canvas(ids, MAX_NEW, BLOCK, tok.mask_id, MAX_LEN, WIDTH)


def _meta(pos, stream, valid):
  pos = jnp.asarray(pos, jnp.int32)[None]
  return masks.make_meta(pos, BLOCK, stream, jnp.where(jnp.asarray(valid)[None], 0, -1))


def _policy_step(opt, x, logits, region, step):
  """The decoder's policy step (no editing), on one row."""
  logits = jnp.asarray(logits).at[..., opt.mask_id].set(-1e30)
  toks, conf, probs = opt.sampling.propose(logits[None], jax.random.key(0))
  entropy, margin = policies.scores(probs)
  cand = (jnp.asarray(x) == opt.mask_id)[None] & jnp.asarray(region)[None]
  slots = jnp.sum(jnp.asarray(region))[None, None]
  accept = opt.policy.select(conf, entropy, margin, cand, slots)
  if step + 1 >= opt.step_cap:
    accept = cand
  return np.where(np.asarray(accept)[0], np.asarray(toks)[0], x)


def _reference_decode(model, params, opt, tokens, maskable, length, start):
  """One row, no persistent cache: every step recomputes the whole prefix."""
  toks = tokens.copy()
  jitted = jax.jit(lambda p, *a, **k: model.apply({"params": p}, *a, return_kv=True, **k))
  apply = lambda *a, **k: jitted(params, *a, **k)
  sb = opt.sub
  for c in range(start, len(toks) // BLOCK):
    lo = c * BLOCK
    if lo >= length or not maskable[lo:].any():
      break
    pos = np.arange(lo + BLOCK)
    exists = pos < length
    for s in range(opt.num_sub):
      region = np.zeros(BLOCK, bool)
      region[s * sb:(s + 1) * sb] = True
      region &= maskable[lo:lo + BLOCK] & exists[lo:]
      step = 0
      while (toks[lo:lo + BLOCK][region] == opt.mask_id).any() and step < opt.step_cap:
        inp = jnp.asarray(np.concatenate([toks[:lo], toks[lo:lo + BLOCK]]))[None]
        meta = _meta(pos[:lo], masks.CLEAN, exists[:lo]).concat(
            _meta(pos[lo:], masks.NOISY, exists[lo:]))
        logits, aux = apply(inp, meta)
        if step == 0 or opt.num_sub == 1:
          snapshot = aux["kv"]
          block_logits = np.asarray(logits[0, lo:])
        else:
          # Sub-block step: the block's K/V come from the sub-block's first step.
          cur = np.zeros(lo + BLOCK, bool)
          cur[lo + s * sb:lo + (s + 1) * sb] = True
          stream = np.where(pos < lo, masks.CLEAN, masks.NOISY)
          cache_meta = masks.make_meta(jnp.asarray(pos)[None], BLOCK, jnp.asarray(stream)[None],
                                       jnp.where(jnp.asarray(exists & ~cur)[None], 0, -1))
          sub_pos = pos[cur]
          sub_logits, _ = apply(jnp.asarray(toks[:lo + BLOCK][cur])[None],
                                _meta(sub_pos, masks.NOISY, sub_pos < length),
                                cache={"k": snapshot[0], "v": snapshot[1], "meta": cache_meta})
          block_logits = np.zeros((BLOCK,) + sub_logits.shape[2:], np.float32)
          block_logits[s * sb:(s + 1) * sb] = np.asarray(sub_logits[0])
        toks[lo:lo + BLOCK] = _policy_step(opt, toks[lo:lo + BLOCK], block_logits, region, step)
        step += 1
    if opt.stop_at_eos and (toks[lo:lo + BLOCK][maskable[lo:lo + BLOCK]] == opt.eos_id).any():
      break
  return toks


@pytest.mark.parametrize("sub_block", [0, 4])
def test_cached_decoding_equals_no_cache_reference(tiny_decoder, sub_block):
  model, tok, params = tiny_decoder
  opt = _options(tok, sub_block_size=sub_block)
  cv = _canvas(tok)
  out = decoder.decode(model, params, cv, opt, prefill_width=16)
  assert out["commit_passes"] == 0
  for i in range(len(PROMPTS)):
    ref = _reference_decode(model, params, opt, cv.tokens[i], cv.maskable[i],
                            int(cv.length[i]), int(cv.start_block[i]))
    np.testing.assert_array_equal(out["tokens"][i], ref)
  # Several tokens per step happened, so the test exercised parallel acceptance.
  assert out["nfe"].min() < MAX_NEW


def test_cached_logits_equal_full_recompute(tiny_decoder):
  """The exact block cache: logits of a noisy block with the cache == without it."""
  model, tok, params = tiny_decoder
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, (1, 4 * BLOCK)).astype(np.int32)
  lo = 3 * BLOCK
  pos = np.arange(4 * BLOCK)
  full = _meta(pos[:lo], masks.CLEAN, np.ones(lo, bool)).concat(
      _meta(pos[lo:], masks.NOISY, np.ones(BLOCK, bool)))
  apply = jax.jit(lambda *a, **k: model.apply({"params": params}, *a, **k),
                  static_argnames="return_kv")
  ref, _ = apply(jnp.asarray(toks), full)
  # Cache with empty slots (negative segment ids) after the committed prefix.
  _, aux = apply(jnp.asarray(toks[:, :lo]),
                       _meta(pos[:lo], masks.CLEAN, np.ones(lo, bool)), return_kv=True)
  k = jnp.zeros(aux["kv"][0].shape[:2] + (WIDTH,) + aux["kv"][0].shape[3:])
  cache = {"k": k.at[:, :, :lo].set(aux["kv"][0]), "v": k.at[:, :, :lo].set(aux["kv"][1]),
           "meta": _meta(np.arange(WIDTH), masks.CLEAN, np.arange(WIDTH) < lo)}
  got, _ = apply(jnp.asarray(toks[:, lo:]),
                       _meta(pos[lo:], masks.NOISY, np.ones(BLOCK, bool)), cache=cache)
  np.testing.assert_allclose(got[0], ref[0, lo:], atol=2e-5, rtol=2e-5)


def test_mixed_prompt_lengths_equal_rows_alone(tiny_decoder):
  model, tok, params = tiny_decoder
  opt = _options(tok)
  both = decoder.decode(model, params, _canvas(tok), opt, prefill_width=16)
  for i, p in enumerate(PROMPTS):
    alone = decoder.decode(model, params, _canvas(tok, [p]), opt, prefill_width=16)
    np.testing.assert_array_equal(both["tokens"][i], alone["tokens"][0])
    np.testing.assert_array_equal(both["steps"][i], alone["steps"][0])
    assert both["nfe"][i] == alone["nfe"][0]


def test_rows_progress_independently(tiny_decoder):
  """Per-row blocks: the batch takes max row NFE forwards, not sum over blocks of max."""
  model, tok, params = tiny_decoder
  prompts = PROMPTS + ["<|bos|>abcdefghi"]  # 10 tokens: a third start offset.
  opt = _options(tok)
  cv = _canvas(tok, prompts)
  out = decoder.decode(model, params, cv, opt, prefill_width=16)
  assert out["forwards"] == out["nfe"].max()
  assert len(set(out["nfe"].tolist())) > 1  # Rows of different speeds were batched.
  for i in range(len(prompts)):
    ref = _reference_decode(model, params, opt, cv.tokens[i], cv.maskable[i],
                            int(cv.length[i]), int(cv.start_block[i]))
    np.testing.assert_array_equal(out["tokens"][i], ref)


def test_left_to_right_equals_reference_one_token_per_forward(tiny_decoder):
  model, tok, params = tiny_decoder
  opt = _options(tok, policy=policies.make_policy("l2r"))
  cv = _canvas(tok)
  out = decoder.decode(model, params, cv, opt, prefill_width=16)
  np.testing.assert_array_equal(out["nfe"], [MAX_NEW, MAX_NEW])
  for i in range(len(PROMPTS)):
    ref = _reference_decode(model, params, opt, cv.tokens[i], cv.maskable[i],
                            int(cv.length[i]), int(cv.start_block[i]))
    np.testing.assert_array_equal(out["tokens"][i], ref)


def test_on_block_streams_each_rows_blocks_in_order(tiny_decoder):
  model, tok, params = tiny_decoder
  got = {}

  def on_block(block_index, tokens, active):
    for row in np.flatnonzero(np.asarray(active)):
      got.setdefault(int(row), []).append((int(block_index[row]), np.asarray(tokens[row])))

  cv = _canvas(tok)
  out = decoder.decode(model, params, cv, _options(tok), on_block=on_block, prefill_width=16)
  for row, blocks in got.items():
    idx = [c for c, _ in blocks]
    assert idx == list(range(int(cv.start_block[row]), idx[-1] + 1))
    for c, toks in blocks:
      np.testing.assert_array_equal(toks, out["tokens"][row, c * BLOCK:(c + 1) * BLOCK])
  assert sorted(got) == [0, 1]


def test_tau_one_decodes_one_token_per_step(tiny_decoder):
  model, tok, params = tiny_decoder
  rows, summary = sample.generate(model, params, tok, PROMPTS,
                                  _options(tok, policy=policies.Threshold(1.0)), MAX_NEW,
                                  MAX_LEN, width=WIDTH)
  for r, p in zip(rows, PROMPTS):
    assert r["nfe"] == r["generated_tokens"] == MAX_NEW
    assert r["tpf"] == 1.0
    n_prompt = len(layout.parse(tok, p).ids)
    first = BLOCK - n_prompt % BLOCK
    assert r["steps_per_block"][0] == first and sum(r["steps_per_block"]) == MAX_NEW
  assert summary["commit_passes"] == 0 and summary["unique_experts"] > 0


def test_infilling_keeps_context_byte_identical(tiny_decoder):
  model, tok, params = tiny_decoder
  texts = ["def f(x):<|mask:5|> return x + 1\n# end<|mask:3|>!",
           "héllo <|mask:2|> wörld <|sep|> tail that is long enough"]
  res = sample.infill(model, params, tok, texts, _options(tok), MAX_LEN)
  for text, r in zip(texts, res):
    pieces = layout._MARKER.split(text)  # pylint: disable=protected-access
    assert r["text"].startswith(text.split("<|mask")[0])
    assert text.split("|>")[-1] in r["text"]
    assert all(len(tok.encode(s)) > 0 for s in r["spans"])
    assert pieces
  parsed = layout.parse(tok, texts[0])
  np.testing.assert_array_equal(res[0]["tokens"][~parsed.maskable], parsed.ids[~parsed.maskable])
  assert not (res[0]["tokens"] == tok.mask_id).any()


@dataclasses.dataclass(eq=False)
class _EosAt:
  """Wraps a model so that it strongly predicts EOS at one absolute position."""

  model: object
  eos_id: int
  position: int

  @property
  def cfg(self):
    return self.model.cfg

  def apply(self, variables, tokens, meta, **kw):
    logits, aux = self.model.apply(variables, tokens, meta, **kw)
    sl = kw.get("logits_slice")
    pos = meta.positions if sl is None else meta.positions[:, sl[0]:sl[0] + sl[1]]
    bias = jnp.where(pos == self.position, 1e4, 0.0)
    return logits.at[..., self.eos_id].add(bias), aux


def test_eos_stops_rows_and_ar_matches_reference(tiny_decoder):
  model, tok, params = tiny_decoder
  eos_model = _EosAt(model, tok.eos_id, 21)
  opt = _options(tok)
  rows, _ = sample.generate(eos_model, params, tok, PROMPTS, opt, MAX_NEW, MAX_LEN,
                            width=WIDTH)
  ar_rows, ar_summary = sample.generate(eos_model, params, tok, PROMPTS, opt, MAX_NEW,
                                        MAX_LEN, width=WIDTH, ar=True)
  for r, a, p in zip(rows, ar_rows, PROMPTS):
    n_prompt = len(layout.parse(tok, p).ids)
    # Counted up to and including EOS at position 21, never the padding after it.
    assert r["generated_tokens"] == a["generated_tokens"] == 21 - n_prompt + 1
    assert r["tokens"][-1] == tok.eos_id and tok.eos_id not in r["tokens"][:-1]
    assert len(r["steps_per_block"]) == 21 // BLOCK - n_prompt // BLOCK + 1
    assert a["nfe"] == a["generated_tokens"]
  assert ar_summary["tpf"] == 1.0
  # AR tokens equal greedy decoding that recomputes the whole prefix each token.
  ids = layout.parse(tok, PROMPTS[1]).ids
  seq = list(ids)
  apply = jax.jit(lambda t, m: model.apply({"params": params}, t, m)[0])
  for q in range(len(ids), len(ids) + 4):
    pos = np.arange(q + 1)
    bids = np.where(pos < len(ids), pos // BLOCK, pos)
    meta = dataclasses.replace(
        _meta(pos, np.where(pos < q, masks.CLEAN, masks.NOISY), np.ones(q + 1, bool)),
        block_ids=jnp.asarray(bids)[None])
    logits = apply(jnp.asarray(seq + [tok.mask_id])[None], meta)
    seq.append(int(jnp.argmax(logits[0, -1].at[tok.mask_id].set(-1e30))))
  assert ar_rows[1]["tokens"][:4] == seq[len(ids):]


@pytest.mark.parametrize("prompts,max_new,match", [
    (["<|bos|>" + "x" * 60], 8, "exceeds the context of 64"),
    ([""], 8, "prompt 0 is empty"),
    (["<|bos|>hi<|nope|>"], 8, "unknown special token '<\\|nope\\|>'"),
    (["<|bos|>hi"], 0, "max_new_tokens must be >= 1, got 0"),
    (["<|bos|>a<|mask:2|>"], 8, "use infill"),
])
def test_bad_input_gives_clear_error(tiny_decoder, prompts, max_new, match):
  model, tok, params = tiny_decoder
  with pytest.raises(ValueError, match=match):
    sample.generate(model, params, tok, prompts, _options(tok), max_new, MAX_LEN)


def test_infill_without_span_is_an_error(tiny_decoder):
  model, tok, params = tiny_decoder
  with pytest.raises(ValueError, match="no <\\|mask:N\\|> span"):
    sample.infill(model, params, tok, ["plain text"], _options(tok), MAX_LEN)
  assert ar  # The AR module is exercised above through sample.generate(ar=True).
