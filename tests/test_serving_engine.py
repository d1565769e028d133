"""The serving engine: batched rounds equal each request decoded alone; queue limits."""

import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.model import build
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample
from blockdiff_jax.serving import engine as engine_lib

MAX_LEN = 64
BLOCK = 8
# Prompt lengths 2..21 tokens: start blocks 0, 1 and 2, prompts ending mid-block.
PROMPTS = ("<|bos|>a", "<|bos|>sort: 3 1 2<|sep|>", "<|bos|>add: 12+34=46; 7+8<|sep|>",
           "<|bos|>xyz")
MAX_TOKENS = (9, 20, 5, 16)


@pytest.fixture(scope="module")
def tiny():
  c = config_lib.base_config()
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.moe.expert_dim = 32
  model, tok = build.build_model(c)
  return model, tok, build.init_params(model, 0)


def _options(tok, **kw):
  kw.setdefault("policy", policies.Threshold(0.05))
  return layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id, **kw)


def _alone(model, params, tok, prompt, max_tokens, options, ar):
  """The reference: the request decoded alone by sampling.sample at its own shapes."""
  rows, _ = sample.generate(model, params, tok, [prompt], options, max_tokens, MAX_LEN, ar=ar)
  return rows[0]


@pytest.mark.parametrize("ar", [False, True])
@pytest.mark.parametrize("slots", [2, 4])
def test_batched_rounds_equal_alone(tiny, ar, slots):
  model, tok, params = tiny
  opts = _options(tok)
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=slots).start()
  streamed = {i: [] for i in range(len(PROMPTS))}
  futures = []
  for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
    req = engine_lib.Request(layout.parse(tok, p).ids, n, opts, ar=ar)
    futures.append(eng.submit(req, on_tokens=streamed[i].extend))
  results = [f.result() for f in futures]
  eng.shutdown()
  assert eng.rounds >= -(-len(PROMPTS) // slots)
  for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
    ref = _alone(model, params, tok, p, n, opts, ar)
    got = results[i]
    assert [int(t) for t in got.token_ids] == ref["tokens"][:len(got.token_ids)]
    assert got.generated_tokens == ref["generated_tokens"]
    assert got.nfe == ref["nfe"]
    assert streamed[i] == [int(t) for t in got.token_ids]  # The stream is the answer.
    assert got.finish_reason == ("stop" if len(got.token_ids) < n else "length")


def test_check_names_the_field(tiny):
  model, tok, params = tiny
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2)
  with pytest.raises(ValueError, match="^prompt"):
    eng.check(np.ones((MAX_LEN,), np.int32), 1)
  with pytest.raises(ValueError, match="^max_tokens"):
    eng.check(np.ones((10,), np.int32), MAX_LEN)
  with pytest.raises(ValueError, match="^max_tokens"):
    eng.check(np.ones((10,), np.int32), -1)


def test_queue_full_and_shutdown(tiny):
  model, tok, params = tiny
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
  assert f1.result().nfe >= 1 and f2.cancelled() and eng.rounds == 1
  with pytest.raises(engine_lib.ShuttingDown):
    eng.submit(req)


def test_failing_request_does_not_disturb_others(tiny):
  model, tok, params = tiny
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


def _compiles(cache):
  """Compiled programs held by a decoder's jit cache (entries x traced shapes)."""
  return sum(fn._cache_size() for fn in list(cache._items.values()))  # pylint: disable=protected-access


@pytest.mark.parametrize("ar", [False, True])
def test_no_recompile_across_requests(tiny, ar):
  from blockdiff_jax.sampling import ar as ar_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import decoder  # pylint: disable=g-import-not-at-top
  model, tok, params = tiny
  cache = ar_lib.JIT_CACHE if ar else decoder.JIT_CACHE
  opts = _options(tok, policy=policies.Threshold(0.3))
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2)
  eng.warmup([(opts, ar)])
  before = _compiles(cache)
  eng.start()
  # Varied prompt lengths, max_tokens, batch fill and streaming: no new program.
  futures = [eng.submit(engine_lib.Request(layout.parse(tok, p).ids, n, opts, ar=ar),
                        on_tokens=(lambda ids: None) if i % 2 else None)
             for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))]
  [f.result() for f in futures]
  eng.submit(engine_lib.Request(layout.parse(tok, PROMPTS[1]).ids, 3, opts, ar=ar)).result()
  eng.shutdown()
  assert _compiles(cache) == before
