"""Serving hardening without a model: request validation edge cases, usage under stop
strings, and the engine's worker against races, unexpected errors and stop strings (a
fake slot pool stands in for the compiled one)."""

import asyncio
import concurrent.futures
import json
import threading
import time
import types

import jax
import numpy as np
import pytest
from aiohttp import web

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import layout
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from blockdiff_jax.serving import protocol
from blockdiff_jax.serving import server as server_lib
from conftest import FakeSlotPool

TOK = tokenizers.ByteTokenizer()
BLOCK, MAX_LEN = 8, 64
PROMPT = np.array([TOK.bos_id, ord("a")], np.int32)
# What every row of the fake pool generates, one token per forward.
ANSWER = "hello world, this fake answer goes on and on and on and on and on!"
OPTIONS = layout.DecodeOptions(block_size=BLOCK, mask_id=TOK.mask_id, eos_id=TOK.eos_id)


def _parse(body, chat=False):
  return protocol.parse_request(dict({"model": "m"}, **body), "m", chat, TOK, BLOCK,
                                TOK.mask_id, TOK.eos_id, protocol.Defaults(),
                                render_chat=lambda ms: "".join(m["content"] for m in ms))


def _error(body, chat=False) -> protocol.ApiError:
  with pytest.raises(protocol.ApiError) as e:
    _parse(body, chat)
  assert e.value.status == 400
  return e.value


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw,param", [
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ('{"prompt": "a", "top_p": NaN}', "top_p"),
    ('{"prompt": "a", "policy": "topk", "policy_value": Infinity}', "policy_value"),
    ('{"prompt": "a", "threshold": -Infinity}', "threshold"),
    ('{"prompt": "a", "edit_threshold": NaN}', "edit_threshold"),
])
def test_non_finite_numbers_are_refused_naming_the_field(raw, param):
  # Python's json reads NaN and Infinity, and NaN passes every range check.
  assert _error(json.loads(raw)).param == param


@pytest.mark.parametrize("body,param", [
    ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"),
    ({"max_steps_per_block": 2**40}, "max_steps_per_block"),
    ({"policy": "topk", "policy_value": 1e30}, "policy_value"),
])
def test_out_of_range_integers_are_refused_naming_the_field(body, param):
  assert _error(dict({"prompt": "a"}, **body)).param == param


def test_the_seed_range_is_what_jax_accepts():
  for seed in protocol.SEED_RANGE:
    assert _parse({"prompt": "a", "seed": seed}).seed == seed
    jax.random.key(seed)  # Raises OverflowError beyond int64.


@pytest.mark.parametrize("field", [
    "stream", "policy", "temperature", "top_p", "n", "seed", "stop", "max_tokens",
    "threshold", "policy_value", "sub_block_size", "edit_threshold", "max_steps_per_block",
    "echo", "logprobs", "best_of", "logit_bias"])
def test_null_is_the_field_left_out(field):
  assert _parse({"prompt": "a", field: None}) == _parse({"prompt": "a"})


def test_null_max_completion_tokens_falls_back_to_max_tokens():
  msgs = [{"role": "user", "content": "hi"}]
  p = _parse({"messages": msgs, "max_completion_tokens": None, "max_tokens": 5}, chat=True)
  assert (p.max_tokens, p.max_tokens_field) == (5, "max_tokens")
  p = _parse({"messages": msgs, "max_completion_tokens": 7}, chat=True)
  assert (p.max_tokens, p.max_tokens_field) == (7, "max_completion_tokens")


@pytest.mark.parametrize("field,value", [
    ("echo", True), ("logprobs", 3), ("logprobs", True), ("top_logprobs", 2),
    ("best_of", 3), ("suffix", "x"), ("logit_bias", {"50": 10}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1)])
def test_unsupported_openai_fields_are_refused(field, value):
  e = _error({"prompt": "a", field: value})
  assert e.param == field and "not supported" in e.message


def test_unsupported_openai_fields_at_their_defaults_are_accepted():
  _parse({"prompt": "a", "echo": False, "top_logprobs": 0, "best_of": 1,
          "suffix": "", "logit_bias": {}, "presence_penalty": 0.0, "frequency_penalty": 0})
  _parse({"messages": [{"role": "user", "content": "x"}], "logprobs": False}, chat=True)


def test_no_seed_is_left_to_the_server():
  assert _parse({"prompt": "a", "temperature": 1.0}).seed is None
  assert _parse({"prompt": "a", "temperature": 1.0, "seed": 3}).seed == 3


# --- the server's own checks ----------------------------------------------------------------

def test_completion_tokens_count_the_ids_up_to_the_stop():
  srv = server_lib.Server(types.SimpleNamespace(tokenizer=TOK), "m")
  result = lambda ids: engine_lib.Result(np.array(ids, np.int32), "length", len(ids),
                                         len(ids), 0.0)
  # A lone 0xff byte decodes to U+FFFD, which encodes back to three bytes.
  finish = srv._finish_text  # pylint: disable=protected-access
  assert finish(result([0xff, ord("K"), ord("x")]), ("K",)) == ("\ufffd", "stop", 2)
  # A special token decodes to nothing; it was generated all the same.
  ids = [ord("a"), TOK.bos_id, ord("b"), ord("K"), ord("z")]
  assert finish(result(ids), ("bK",)) == ("a", "stop", 4)
  assert finish(result(ids), ("q",)) == ("abKz", "length", 5)


def test_engine_check_errors_name_the_request_field_and_code():
  srv = server_lib.Server(engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN), "m")

  def error(ids, max_tokens, chat=False, field="max_tokens"):
    with pytest.raises(protocol.ApiError) as e:
      srv.check(np.asarray(ids, np.int32), max_tokens, chat, field)
    assert e.value.status == 400 and e.value.message.startswith(e.value.param + ":")
    return e.value.param, e.value.code

  assert error([TOK.bos_id, TOK.mask_id], 4) == ("prompt", None)
  assert error([TOK.bos_id, TOK.mask_id], 4, chat=True) == ("messages", None)
  assert error([], 4) == ("prompt", None)
  assert error([TOK.bos_id], 0, True, "max_completion_tokens") == (
      "max_completion_tokens", None)
  long = "context_length_exceeded"
  assert error([TOK.bos_id] * MAX_LEN, 1, chat=True) == ("messages", long)
  assert error([TOK.bos_id] * 10, MAX_LEN, True, "max_completion_tokens") == (
      "max_completion_tokens", long)


@pytest.mark.parametrize("exc", [ConnectionResetError, RuntimeError])
def test_a_stream_that_cannot_start_drops_its_request(monkeypatch, exc):
  future = concurrent.futures.Future()
  eng = types.SimpleNamespace(tokenizer=TOK, submit=lambda req, on_tokens=None: future)
  srv = server_lib.Server(eng, "m")

  async def prepare(self, request):
    raise exc("the client went away")
  monkeypatch.setattr(web.StreamResponse, "prepare", prepare)
  parsed = _parse({"prompt": "a", "stream": True})
  with pytest.raises(exc):
    asyncio.run(srv._stream(  # pylint: disable=protected-access
        None, None, parsed, "cmpl-1", False))
  assert future.cancelled()  # Nobody decodes for a stream that never started.


# --- the engine's worker, over a fake pool --------------------------------------------------

class _FakePool(FakeSlotPool):
  """A pool without a model: each forward makes one more token of ``ANSWER`` final in
  every busy row (as AR decoding does)."""

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)
    self.forwards = 0

  def advance(self):
    self.forwards += 1
    answer = TOK.encode(ANSWER)
    view = pool_lib.HostView(done=np.ones(self.slots, bool),
                             final=np.zeros(self.slots, np.int32),
                             nfe=np.zeros(self.slots, np.int32),
                             tokens=np.zeros((self.slots, self.width), np.int32))
    for slot, row in self.rows.items():
      if self.occupied[slot] and row[2] < row[1]:
        row[2] += 1
      start, max_tokens, n = row
      view.tokens[slot, start:start + n] = answer[:n]
      view.final[slot], view.nfe[slot] = start + n, n
      view.done[slot] = n >= max_tokens
    return view


@pytest.fixture
def fake():
  """(an engine over fake pools, not started; the pools it made)."""
  pools = []

  def make(*args, **kw):
    pools.append(_FakePool(*args, **kw))
    return pools[-1]
  patch = pytest.MonkeyPatch()
  patch.setattr(pool_lib, "SlotPool", make)
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN, slots=2)
  yield eng, pools
  eng.shutdown(drain=False)
  patch.undo()


def _request(max_tokens=8, **kw):
  return engine_lib.Request(PROMPT, max_tokens, OPTIONS, ar=True, **kw)


@pytest.mark.parametrize("where", ["prefill", "queue_timeout", "decode_timeout"])
def test_a_cancel_racing_the_worker_does_not_kill_it(fake, monkeypatch, where):
  """The client cancels a future just before the worker resolves it (between its done()
  check and the set): InvalidStateError must not end the worker."""
  eng, _ = fake
  real = concurrent.futures.Future.set_exception

  def set_exception(future, exc):
    if getattr(future, "race", False):
      future.cancel()  # The client's cancel lands first.
    real(future, exc)
  monkeypatch.setattr(concurrent.futures.Future, "set_exception", set_exception)
  if where == "prefill":
    admit = _FakePool.admit
    monkeypatch.setattr(_FakePool, "admit", lambda pool, prompt, n, seed=0: (
        admit(pool, prompt, n) if n != 5 else 1 / 0))
    raced = eng.submit(_request(5))
  elif where == "queue_timeout":
    raced = eng.submit(_request(deadline=time.monotonic() - 1))
  else:
    advance = _FakePool.advance
    monkeypatch.setattr(_FakePool, "advance", lambda pool: (time.sleep(0.01),
                                                            advance(pool))[1])
    raced = eng.submit(_request(60, deadline=time.monotonic() + 0.1))
  raced.race = True
  eng.start()
  # Polled: Future.cancel() does not wake concurrent.futures.wait.
  deadline = time.monotonic() + 120
  while not raced.cancelled() and time.monotonic() < deadline:
    time.sleep(0.01)
  assert raced.cancelled()
  after = eng.submit(_request(4))  # The worker still serves.
  assert TOK.decode(after.result(timeout=20).token_ids) == ANSWER[:4]
  assert eng.healthy


@pytest.mark.parametrize("broken", ["build", "release"])
def test_an_unexpected_error_fails_only_its_requests(fake, monkeypatch, broken):
  eng, pools = fake
  if broken == "build":  # The block decoder's pool fails to build (e.g. to compile).
    make = pool_lib.SlotPool
    monkeypatch.setattr(pool_lib, "SlotPool", lambda model, params, dec, *a: (
        make(model, params, dec, *a) if dec.kind == "ar" else 1 / 0))
    bad = eng.submit(engine_lib.Request(PROMPT, 4, OPTIONS))
  else:  # Releasing a finished row raises: the pool's state is unknown.
    release = _FakePool.release
    monkeypatch.setattr(_FakePool, "release", lambda pool, slot: (
        release(pool, slot) if len(pools) > 1 else 1 / 0))
    bad = eng.submit(_request(3))
  eng.start()
  with pytest.raises(ZeroDivisionError):
    bad.result(timeout=20)
  good = eng.submit(_request(6))
  assert TOK.decode(good.result(timeout=20).token_ids) == ANSWER[:6]
  assert eng.healthy and eng.running == 0


def test_a_dead_worker_fails_its_requests_and_is_reported(fake):
  eng, _ = fake
  queued = eng.submit(_request())

  def broken():
    raise RuntimeError("a bug in the worker")
  eng._take = broken  # pylint: disable=protected-access
  eng.start()
  with pytest.raises(RuntimeError, match="worker stopped"):
    queued.result(timeout=20)  # Failed, not left to hang.
  with pytest.raises(engine_lib.ShuttingDown, match="worker stopped"):
    eng.submit(_request())
  assert not eng.healthy
  health = asyncio.run(server_lib.Server(eng, "m").health(None))
  assert health.status == 503 and json.loads(health.body)["status"] == "engine_failed"


def test_a_stop_string_ends_decoding(fake):
  eng, pools = fake
  streamed = []
  stopped = eng.submit(_request(40, stop=("xyz", "o w")), on_tokens=streamed.extend)
  eng.start()
  result = stopped.result(timeout=20)
  # "o w" is complete at the 7th token: decoding ends there, not at max_tokens.
  assert result.nfe == 7 and pools[0].forwards == 7 and pools[0].retired == 1
  assert result.finish_reason == "stop" and TOK.decode(result.token_ids) == ANSWER[:7]
  assert streamed == [int(t) for t in result.token_ids]
  full = eng.submit(_request(12, stop=("xyz",))).result(timeout=20)
  assert full.finish_reason == "length" and full.nfe == 12


class _RowsChangedMidway(dict):
  """Rows of pools that the worker changes while another thread iterates them (the GIL
  lets the worker in between any two steps of that iteration)."""

  def values(self):
    it = iter(super().values())
    yield next(it)
    self[len(self)] = {}  # Meanwhile the worker makes a pool.
    yield from it


def test_running_is_safe_to_read_while_the_worker_changes_its_rows():
  """``running`` is read by the HTTP thread (``/health``) while the worker runs."""
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN)
  eng._rows = _RowsChangedMidway({0: {}, 1: {}})  # pylint: disable=protected-access
  assert eng.running == 0


def test_a_new_decoder_compiles_while_the_other_requests_decode(fake, monkeypatch):
  """A request with decoder options never seen before builds (compiles) its pool off the
  worker thread: requests of the pools already made keep decoding meanwhile."""
  eng, _ = fake
  compiling, release = threading.Event(), threading.Event()
  make = pool_lib.SlotPool

  def slow_block_pool(model, params, dec, *args):
    if dec.kind != "ar":
      compiling.set()
      assert release.wait(timeout=60)  # The "compile" lasts until the test says so.
    return make(model, params, dec, *args)
  monkeypatch.setattr(pool_lib, "SlotPool", slow_block_pool)
  eng.warmup([(OPTIONS, True)])  # The server's configured decoder, compiled at start.
  eng.start()
  new = eng.submit(engine_lib.Request(PROMPT, 4, OPTIONS))  # The block decoder: new.
  assert compiling.wait(timeout=20)
  old = eng.submit(_request(6))
  assert TOK.decode(old.result(timeout=20).token_ids) == ANSWER[:6]  # Not stalled.
  assert not new.done()
  release.set()
  assert TOK.decode(new.result(timeout=20).token_ids) == ANSWER[:4]


@pytest.mark.parametrize("field,value", [("top_k", 40), ("max_tokens", 8), ("seed", 3)])
def test_a_whole_float_integer_field_is_that_integer(field, value):
  """A client that writes every number as a float (40.0) means the integer."""
  body = {"prompt": "a", "temperature": 1.0, field: value}
  assert _parse(dict(body, **{field: float(value)})) == _parse(body)


def test_a_fractional_top_k_is_refused_naming_top_k():
  with pytest.raises(protocol.ApiError) as e:
    _parse({"prompt": "a", "top_k": 2.5})
  assert e.value.param == "top_k" and "integer" in str(e.value)
