"""The serving engine: continuous batching equals each request decoded alone; queue limits."""

import threading

import numpy as np
import pytest

from conftest import BACKEND_COMPILE_EVENT
from conftest import JaxEventCounter
from blockdiff_jax.model import build
from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib

MAX_LEN = 64
BLOCK = 8
# Prompt lengths 2..21 tokens: start blocks 0, 1 and 2, prompts ending mid-block.
PROMPTS = ("<|bos|>a", "<|bos|>sort: 3 1 2<|sep|>", "<|bos|>add: 12+34=46; 7+8<|sep|>",
           "<|bos|>xyz")
MAX_TOKENS = (9, 20, 5, 16)


def _options(tok, **kw):
  kw.setdefault("policy", policies.Threshold(0.05))
  return layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id, **kw)


_ALONE: dict = {}  # (prompt, max_tokens, options, ar) -> its reference row.


def _alone(model, params, tok, prompt, max_tokens, options, ar):
  """The reference: the request decoded alone (batch 1) by sampling.sample.

  Memoized (the tests share ``tiny_decoder``): the engine cases differ in slots and
  forwards per call, not in their references. The canvas is MAX_LEN wide (the pool's
  width), so the references share compiled programs; a decoder's row does not depend on
  the canvas slots past its end (test_sampling_decoder's and test_sampling_isd's rows of
  mixed lengths equal each row alone).
  """
  key = (id(model), id(params), prompt, max_tokens, options, ar)
  if key not in _ALONE:
    rows, _ = sample.generate(model, params, tok, [prompt], options, max_tokens, MAX_LEN,
                              width=MAX_LEN, ar=ar)
    _ALONE[key] = rows[0]
  return _ALONE[key]


@pytest.mark.parametrize("ar", [False, True])
@pytest.mark.parametrize("slots,forwards_per_call", [(2, 1), (3, 4)])
def test_batched_equal_alone(tiny_decoder, ar, slots, forwards_per_call):
  model, tok, params = tiny_decoder
  opts = _options(tok)
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=slots,
                          forwards_per_call=forwards_per_call).start()
  streamed = {i: [] for i in range(len(PROMPTS))}
  futures = []
  for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
    req = engine_lib.Request(layout.parse(tok, p).ids, n, opts, ar=ar)
    futures.append(eng.submit(req, on_tokens=streamed[i].extend))
  results = [f.result() for f in futures]
  eng.shutdown()
  assert eng.admitted == len(PROMPTS)
  for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
    ref = _alone(model, params, tok, p, n, opts, ar)
    got = results[i]
    assert [int(t) for t in got.token_ids] == ref["tokens"][:len(got.token_ids)]
    assert got.generated_tokens == ref["generated_tokens"]
    assert got.nfe == ref["nfe"]
    assert streamed[i] == [int(t) for t in got.token_ids]  # The stream is the answer.
    assert got.finish_reason == ("stop" if len(got.token_ids) < n else "length")


def test_check_names_the_field(tiny_decoder):
  model, tok, params = tiny_decoder
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2)
  with pytest.raises(ValueError, match="^prompt"):
    eng.check(np.ones((MAX_LEN,), np.int32), 1)
  with pytest.raises(ValueError, match="^max_tokens"):
    eng.check(np.ones((10,), np.int32), MAX_LEN)
  with pytest.raises(ValueError, match="^max_tokens"):
    eng.check(np.ones((10,), np.int32), -1)


def test_queue_full_and_shutdown(tiny_decoder):
  model, tok, params = tiny_decoder
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=1, queue_size=2)
  req = engine_lib.Request(layout.parse(tok, PROMPTS[0]).ids, 4, _options(tok))
  # Not started: nothing leaves the queue.
  f1, f2 = eng.submit(req), eng.submit(req)
  with pytest.raises(engine_lib.QueueFull) as e:
    eng.submit(req)
  assert e.value.retry_after_s >= 1
  f2.cancel()  # A client that left: its request is skipped, never decoded.
  eng.start()
  eng.shutdown(drain=True)  # Drains what was queued.
  assert f1.result().nfe >= 1 and f2.cancelled() and eng.admitted == 1
  with pytest.raises(engine_lib.ShuttingDown):
    eng.submit(req)


def test_failing_request_does_not_disturb_others(tiny_decoder):
  model, tok, params = tiny_decoder
  opts = _options(tok)
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=3)
  good = engine_lib.Request(layout.parse(tok, PROMPTS[1]).ids, 8, opts)
  def bad_stream(ids):
    raise RuntimeError("consumer broke")

  # A request whose stream consumer raises, next to a healthy one: both finish.
  f_bad = eng.submit(good, on_tokens=bad_stream)
  f_good = eng.submit(good)
  eng.start()
  eng.shutdown()
  assert list(f_bad.result().token_ids) == list(f_good.result().token_ids)


_COMPILES = JaxEventCounter(BACKEND_COMPILE_EVENT)


@pytest.mark.parametrize("ar", [False, True])
def test_no_recompile_across_requests(tiny_decoder, ar):
  model, tok, params = tiny_decoder
  opts = _options(tok, policy=policies.Threshold(0.3))
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2)
  _COMPILES.active, _COMPILES.count = True, 0
  try:
    compile_s = eng.warmup([(opts, ar)])
    warm = _COMPILES.count
    eng.start()
    # Varied prompt lengths, max_tokens, batch fill and streaming: no new program.
    futures = [eng.submit(engine_lib.Request(layout.parse(tok, p).ids, n, opts, ar=ar),
                          on_tokens=(lambda ids: None) if i % 2 else None)
               for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    [f.result() for f in futures]
    eng.submit(engine_lib.Request(layout.parse(tok, PROMPTS[1]).ids, 3, opts, ar=ar)
               ).result()
    eng.shutdown()
  finally:
    _COMPILES.active = False
  assert compile_s > 0 and warm >= 3  # admit (per prefill bucket), advance, retire.
  assert _COMPILES.count == warm


def _shifted(tok, **kw):
  """Options of a token-shifted model (the tiny random model read as a causal LM)."""
  return _options(tok, token_shift=True, **kw)


def _alone_decoder(model, params, tok, prompt, max_tokens, options, kind, stride, seed=0):
  """The reference for any decoder: the request alone, by the batch decoders, key per row."""
  import jax  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import ar as ar_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import decoder  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import isd  # pylint: disable=g-import-not-at-top
  ids = layout.parse(tok, prompt).ids
  # MAX_LEN wide: the five prompts share two compiled programs (their prefill buckets)
  # instead of one each; the slots past a row's end change none of its outputs.
  canvas = layout.generation_canvas([ids], max_tokens, BLOCK, tok.mask_id, MAX_LEN, MAX_LEN)
  rng = jax.random.key(seed)[None]  # One key per row, as the pool draws.
  if kind == "isd":
    out = isd.decode_isd(model, params, canvas, options, stride, rng)
  elif kind == "ar":
    out = ar_lib.decode_ar(model, params, canvas, options, rng)
  else:
    out = decoder.decode(model, params, canvas, options, rng)
  gen = out["tokens"][0, len(ids):len(ids) + max_tokens]
  hits = np.flatnonzero(gen == tok.eos_id)
  return [int(t) for t in gen[:hits[0] if hits.size else len(gen)]], int(out["nfe"][0])


# Each decoder once, sampled (each request its own seed: rows must draw independently)
# except plain block decoding and the hierarchical cache, which run greedy. Greedy AR in
# the pool is test_batched_equal_alone's, greedy ISD test_serving_http's.
SETUPS = [("block", 0, {}, 0.0), ("block", 0, {"sub_block_size": 4}, 1.0),
          ("ar", 0, {}, 1.0), ("isd", 4, {}, 1.0),
          # The hierarchical cache in the pool (rank 4 of chunks of 8: approximate, and
          # compressing; rows must still not see each other).
          ("block", 0, {"kv_hierarchy": hierarchical_cache.Hierarchy(1, 8, 4)}, 0.0)]


@pytest.mark.parametrize("kind,stride,kw,temperature", SETUPS)
def test_staggered_arrivals_equal_alone(tiny_decoder, kind, stride, kw, temperature):
  """Requests join a running batch at arbitrary forwards; each answer equals it alone."""
  model, tok, params = tiny_decoder
  sampling = policies.Sampling(temperature)
  opts = (_shifted(tok, sampling=sampling, **kw) if kind == "isd"
          else _options(tok, sampling=sampling, **kw))
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2).start()
  prompts = PROMPTS + ("<|bos|>sort: 9 8 7 6 5 4<|sep|>",)
  max_tokens = MAX_TOKENS + (24,)
  futures, seen = [], []
  for i, (p, n) in enumerate(zip(prompts, max_tokens)):
    if i:  # Arrive once the batch has run a few forwards (not at a round boundary).
      target = eng.forwards + 1 + i % 3
      for _ in range(100000):  # Bounded: the batch runs while earlier requests decode.
        if eng.forwards >= target or all(f.done() for f in futures):
          break
        threading.Event().wait(0.001)
    seen.append(eng.running)
    req = engine_lib.Request(layout.parse(tok, p).ids, n, opts, ar=kind == "ar", seed=7 + i,
                             isd_stride=stride)
    futures.append(eng.submit(req))
  results = [f.result() for f in futures]
  eng.shutdown()
  assert max(seen) >= 1  # Some request arrived while others were decoding.
  for i, (p, n) in enumerate(zip(prompts, max_tokens)):
    ref, nfe = _alone_decoder(model, params, tok, p, n, opts, kind, stride, seed=7 + i)
    assert [int(t) for t in results[i].token_ids] == ref, (i, p)
    assert results[i].nfe == nfe


def test_cancel_mid_decode_frees_the_slot(tiny_decoder):
  """A request cancelled while decoding (a client gone) leaves its slot at the next forward."""
  model, tok, params = tiny_decoder
  opts = _options(tok, policy=policies.Threshold(1.0))  # One token per forward: slow.
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=1).start()
  started = threading.Event()
  long = eng.submit(engine_lib.Request(layout.parse(tok, PROMPTS[0]).ids, 40, opts),
                    on_tokens=lambda ids: started.set())
  assert started.wait(600)  # Its first block is out: it holds the only slot.
  assert eng.running == 1 and long.cancel()
  # The next request takes the freed slot and finishes; the cancelled one never does.
  short = eng.submit(engine_lib.Request(layout.parse(tok, PROMPTS[1]).ids, 3, opts))
  assert short.result().nfe >= 1 and long.cancelled()
  eng.shutdown()
  assert eng.running == 0


def test_failing_forward_fails_only_its_culprit(tiny_decoder, monkeypatch):
  """A forward that raises while a poisoned request is in the batch: it reruns each request
  alone, so the others finish with their own answers and only the culprit fails."""
  model, tok, params = tiny_decoder
  opts = _options(tok)
  poison = layout.parse(tok, "<|bos|>xyz").ids
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=3)
  real = pool_lib.SlotPool.advance

  def advance(pool):
    # .get: the pool's warm-up (on the compile thread) advances it before it has rows.
    rows = eng._rows.get(pool.decoder, {})  # pylint: disable=protected-access
    if any(np.array_equal(p.request.prompt_ids, poison) for p in rows.values()):
      raise RuntimeError("device error")
    return real(pool)
  monkeypatch.setattr(pool_lib.SlotPool, "advance", advance)
  prompts = [PROMPTS[0], "<|bos|>xyz", PROMPTS[1]]
  futures = [eng.submit(engine_lib.Request(layout.parse(tok, p).ids, 8, opts))
             for p in prompts]
  eng.start()
  eng.shutdown()
  with pytest.raises(RuntimeError, match="device error"):
    futures[1].result()
  for i in (0, 2):
    ref = _alone(model, params, tok, prompts[i], 8, opts, False)
    assert [int(t) for t in futures[i].result().token_ids] == ref["tokens"][
        :len(futures[i].result().token_ids)]


@pytest.mark.parametrize("block,max_prompt,want", [(8, 63, (8, 16, 32, 64)), (8, 8, (8,)),
                                                   (4, 20, (4, 8, 16, 20))])
def test_prefill_buckets_double_up_to_the_longest_prompt(block, max_prompt, want):
  assert pool_lib.prefill_buckets(block, max_prompt) == want


def test_decoder_setup_is_validated():
  opts = layout.DecodeOptions(block_size=BLOCK, mask_id=3, eos_id=2)
  with pytest.raises(ValueError, match="kind"):
    pool_lib.Decoder(opts, "beam")
  with pytest.raises(ValueError, match="token-shifted"):
    pool_lib.Decoder(opts, "isd", 4)
  with pytest.raises(ValueError, match="isd_stride"):
    pool_lib.Decoder(layout.DecodeOptions(block_size=BLOCK, mask_id=3, eos_id=2,
                                          token_shift=True), "isd", 1)


def test_summary_token_model_with_the_summary_form_cache_served_equals_alone():
  """A ChatDLM summary-token model in the pool: its slot bank and a ring-only cache ride in
  each row's state; batched answers equal each request decoded alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from conftest import small_model_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import decoder  # pylint: disable=g-import-not-at-top
  c = small_model_config()
  c.diffusion.block_size = BLOCK
  c.model.summary.num_slots, c.model.summary.window_blocks = 2, 1
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 200, n).astype(np.int32) for n in (37, 21, 9, 30)]
  opts = _options(tok, stop_at_eos=False,
                  kv_hierarchy=hierarchical_cache.Hierarchy(window=1, chunk=BLOCK,
                                                            form="summary"))
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2).start()
  futures = [eng.submit(engine_lib.Request(p, 24, opts)) for p in prompts]
  results = [f.result() for f in futures]
  eng.shutdown()
  for p, got in zip(prompts, results):
    # One shape for the four references (one compile): MAX_LEN wide, prefilled 32 wide
    # (the longest prompt's start block); a row is prefilled only below its own start
    # block and never sees the slots past its end, so neither width changes its output.
    cv = layout.generation_canvas([p], 24, BLOCK, tok.mask_id, MAX_LEN, MAX_LEN)
    out = decoder.decode(model, params, cv, opts, jax.random.key(0)[None], prefill_width=32)
    want = out["tokens"][0, len(p):len(p) + 24]
    assert [int(t) for t in got.token_ids] == [int(t) for t in want]
    assert got.nfe == int(out["nfe"][0])
