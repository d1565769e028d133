"""Hardening of ISD's counters, its trace, the AR comparison and self-distillation.

The ISD checks run a byte-vocabulary lookahead LM (its MASK slots draft d tokens ahead,
EOS included, wrong where told) against a plain-Python ISD written from the algorithm's
description: per forward the drafts verified, those accepted and written, and the
tokens emitted; the decoder's counters and the trace must agree with it.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import distill
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import speedup
from blockdiff_jax.sampling import trace
from test_sampling_isd import TableLM  # The lookahead LM, here over the byte vocabulary.

BYTES = tokenizers.ByteTokenizer()
MASK, EOS, VOCAB = BYTES.mask_id, BYTES.eos_id, BYTES.vocab_size
DEPTH = 8  # Lookahead distances the table tells apart (longer ones use the last row).
LETTERS = "abcdefgh"


def _next(t: int) -> int:
  """The LM's greedy chain: letter i -> letter i+3 (mod 8), "g" -> EOS, else -> "a"."""
  if t == ord("g"):
    return EOS
  if t < 128 and chr(t) in LETTERS:
    return ord(LETTERS[(LETTERS.index(chr(t)) + 3) % 8])
  return ord("a")


def _table() -> np.ndarray:
  """table[d, t] peaks at the chain's (d+1)-th successor of t: MASK slots draft it."""
  table = np.zeros((DEPTH, VOCAB, VOCAB), np.float32)
  for t in range(VOCAB):
    x = t
    for d in range(DEPTH):
      x = _next(x)
      table[d, t, x] = 8.0
  return table


def _draft(table, wrong_every, t, d, position):
  logits = table[min(d, DEPTH - 1), t].copy()
  if wrong_every and position % wrong_every == 0:
    logits = np.roll(logits, 1)
  logits[MASK] = -np.inf
  return int(np.argmax(logits))


def _python_isd(table, wrong_every, prompt, n, length, stop_at_eos):
  """Greedy ISD of one row, forward by forward, as the module docstring describes it.

  Returns (generated ids, [(verified drafts, accepted and written, emitted ids)]).
  """
  toks = list(prompt)
  draft = lambda t, d, p: _draft(table, wrong_every, t, d, p)
  # The prefill is a cold start whose pending token is the prompt's last.
  pending = len(toks) - 1
  toks.append(_next(toks[-1]))
  drafts = [draft(toks[pending], j, pending + j) for j in range(1, n)]
  records, warm = [([], 0, [toks[-1]])], True
  done = (stop_at_eos and toks[-1] == EOS) or len(toks) >= length
  while not done:
    pos = len(toks) - 1
    a, prev = 0, toks[pos]
    while warm and a < n - 1 and drafts[a] == _next(prev):
      prev = drafts[a]
      a += 1
    emitted = drafts[:a] + [_next(prev)]
    if stop_at_eos and EOS in emitted:
      emitted = emitted[:emitted.index(EOS) + 1]
    written = emitted[:length - pos - 1]
    records.append((list(drafts) if warm else [], min(a, len(written)), written))
    toks += written
    done = (stop_at_eos and EOS in emitted) or pos + a + 2 >= length
    if warm and a == n - 1:  # All accepted: the MASK slots after the last draft.
      drafts = [draft(drafts[-1], d, pos + n - 1 + d) for d in range(1, n)]
    elif not warm:  # Cold: the MASK slots after the pending token.
      drafts, warm = [draft(toks[pos], j, pos + j) for j in range(1, n)], True
    else:
      warm = False
  return toks[len(prompt):], records


# Prompts of 1 and 3 tokens (two prefill widths for the trace to compile) whose chains
# reach EOS at their 8th, 3rd, 5th and 2nd token.
PROMPTS = ["b", "<|bos|>fa", "hhc", "ghd"]


@pytest.mark.parametrize("stride,wrong_every,stop_at_eos,max_new", [
    (4, 0, True, 9),  # Perfect drafts: EOS inside an accepted run of drafts.
    (3, 4, True, 5),  # Rejections, cold starts, EOS, and a row cut at its end mid-stride.
    (2, 0, False, 6),  # The smallest stride, past EOS: the end falls inside the drafts.
])
def test_isd_counters_and_trace_match_a_python_isd(stride, wrong_every, stop_at_eos,
                                                    max_new):
  """Before: ``accepted`` (and the trace's per-forward count) missed one draft whenever
  an EOS or the row's end fell inside the accepted drafts."""
  table = _table()
  fn, params = TableLM(wrong_every, mask_id=MASK), {"table": jnp.asarray(table)}
  opts = layout.DecodeOptions(block_size=1, mask_id=MASK, eos_id=EOS, token_shift=True,
                              stop_at_eos=stop_at_eos)
  ids = [layout.parse(BYTES, p).ids for p in PROMPTS]
  canvas = layout.generation_canvas(ids, max_new, 1, MASK, 64)
  out = isd.decode_isd(fn, params, canvas, opts, stride)
  cut_inside_drafts = False
  for i, (p, row) in enumerate(zip(PROMPTS, ids)):
    gen, records = _python_isd(table, wrong_every, list(row), stride, len(row) + max_new,
                               stop_at_eos)
    # The plain AR chain, EOS and length cut applied: ISD must emit exactly it.
    ar, t = [], int(row[-1])
    while len(ar) < max_new and not (stop_at_eos and ar and ar[-1] == EOS):
      t = _next(t)
      ar.append(t)
    assert gen == ar, p
    np.testing.assert_array_equal(out["tokens"][i, len(row):len(row) + len(gen)], gen)
    assert (out["tokens"][i, len(row) + len(gen):canvas.length[i]] == MASK).all()
    assert out["nfe"][i] == len(records), p
    assert out["accepted"][i] == sum(r[1] for r in records), p
    cut_inside_drafts |= any(acc == len(e) for _, acc, e in records if acc)
    got = trace.isd_trace(fn, params, BYTES, p, opts, stride, max_new, 64)
    text = lambda toks: [BYTES.decode([t]) for t in toks]
    assert [(f["verified"], f["accepted"], f["emitted"]) for f in got["forwards"]] == [
        (text(v), acc, text(e)) for v, acc, e in records], p
  assert cut_inside_drafts  # The case the old count got wrong is exercised.


# --- The comparison with AR: arithmetic and inputs. ---


def _fake_generate(counts):
  """A ``generation.generate`` that returns ``counts[decoder] = (tokens, wall_s)``."""
  def generate(ar=False, isd_stride=0, **kw):
    del kw
    n, wall = counts["ar" if ar else "dec"]
    row = {"completion": "x" * n, "tokens": list(range(n)), "generated_tokens": n,
           "nfe": n, "tpf": 1.0}
    return [row], {"wall_s": wall}
  return generate


def test_each_prompts_speedup_is_its_tokens_per_second_ratio(monkeypatch):
  """Before: the per-prompt line printed AR's wall time over the decoder's, so a decoder
  that stopped after 3 tokens in 0.5 s showed 2.40x against AR's 12 tokens in 1.2 s."""
  counts = {"ar": (12, 1.2), "dec": (3, 0.5)}
  monkeypatch.setattr(speedup.generation, "generate", _fake_generate(counts))
  lines = []
  opts = layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS)
  rows, summary = speedup.compare_with_ar(None, None, BYTES, ["p"], opts, 16, 64,
                                          speedup.Decoder("threshold"), log=lines.append)
  want = (3 / 0.5) / (12 / 1.2)
  assert summary["speedup"] == pytest.approx(want)
  assert f"{want:.2f}x AR" in lines[0], lines
  assert not rows[0]["identical"] and rows[0]["wall_s"] == 0.5


@pytest.mark.parametrize("kwargs,match", [
    ({"policy": "isd"}, r"policy='isd' needs isd_stride >= 2, got 0"),
    ({"policy": "threshold", "isd_stride": 4}, r"isd_stride=4 is only for policy='isd'"),
    ({"policy": "isd", "isd_stride": 2.0}, r"isd_stride must be an integer, got 2.0"),
])
def test_a_decoder_that_would_time_the_wrong_loop_is_refused(kwargs, match):
  # Before: Decoder("isd") timed the block decoder and reported it as "isd N=0".
  with pytest.raises(ValueError, match=match):
    speedup.Decoder(**kwargs)


def test_compare_with_ar_refuses_sampling_before_decoding(monkeypatch):
  calls = []
  monkeypatch.setattr(speedup.generation, "generate", lambda **kw: calls.append(kw))
  opts = layout.DecodeOptions(block_size=1, mask_id=MASK, eos_id=EOS, token_shift=True,
                              sampling=policies.Sampling(temperature=0.7))
  with pytest.raises(ValueError, match="temperature must be 0, got 0.7"):
    speedup.compare_with_ar(None, None, BYTES, ["p"], opts, 8, 64, speedup.Decoder("isd", 3))
  assert not calls


# --- Self-distillation settings. ---


def test_a_distill_batch_of_one_is_refused_by_the_config_check():
  """Before: ``validate`` let distill.batch_size=1 through and ``--mode=distill`` failed
  only after loading the model, in ``greedy_answers``."""
  c = config_lib.base_config()
  c.distill.batch_size = 1
  with pytest.raises(ValueError, match=r"distill\.batch_size must be an integer >= 2, got 1"):
    distill.validate(c)
  c.distill.batch_size = 2
  distill.validate(c)


def test_an_empty_question_file_is_named_before_the_model_loads(tmp_path, monkeypatch):
  """Before: the model loaded, then the error blamed distill.max_len ("no question fits")."""
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  loads = []
  monkeypatch.setattr(inference, "load_for_inference", lambda *a: loads.append(a))
  source = tmp_path / "questions.txt"
  source.write_text("\n  \n\n")
  c = config_lib.base_config()
  c.distill.source = str(source)
  with pytest.raises(ValueError, match=r"distill\.source='.*questions\.txt' holds no questions"):
    distill.run(c, str(tmp_path / "run"))
  assert not loads
