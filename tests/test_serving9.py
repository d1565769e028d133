"""Serving hardening (serving9): a request for a decoder setup with no room for its pool
is not overtaken by later requests of the busy pools; chat roles outside OpenAI's set
are refused naming the message; a body over the size limit is a 413 naming the limit;
a streamed stop string whose last character arrives split between two chunks never
leaks its start into the stream.

References: the arrival order of the requests (admission must follow it), OpenAI's list
of chat roles, aiohttp's default ``client_max_size`` (1 MiB), and the text cut at its
first stop string by hand (and unstreamed). No model: the engine
runs over a fake pool, the server over a recording engine.
"""

import concurrent.futures
import json
import threading

import numpy as np
import pytest

from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from blockdiff_jax.serving import server as server_lib
from conftest import RunningServer
from test_hardening_serving3 import _post as post
from test_hardening_serving5 import _RecordingEngine
from test_serving6 import _XPool
from test_serving6 import _options
from test_serving6 import _parse
from test_serving6 import BLOCK
from test_serving6 import MAX_LEN
from test_serving6 import PROMPT
from test_serving6 import TOK

MODEL = "m"


# --- the engine: a setup waiting for room for its pool --------------------------------------

class _LoggingPool(_XPool):
  """``_XPool`` (a row is done after ``max_tokens`` forwards) that logs each admission's
  seed, the request's arrival index here."""

  admitted: list

  def admit(self, prompt, max_tokens, seed=0):
    self.admitted.append(seed)
    return super().admit(prompt, max_tokens, seed)


def test_a_request_waiting_for_room_for_its_pool_is_not_overtaken(monkeypatch):
  """One pool at most, two slots. Request 2 needs a second decoder: no room until the
  busy pool idles. Requests 3.. of the busy pool must not take its freed slots first:
  each admitted one kept it busy, so request 2 waited for all of them (under a steady
  load, until its time limit)."""
  log = []
  monkeypatch.setattr(_LoggingPool, "admitted", log, raising=False)
  monkeypatch.setattr(pool_lib, "SlotPool", _LoggingPool)
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN, slots=2, max_pools=1)
  # (threshold = decoder setup, max_tokens = forwards until done), in arrival order.
  setups = [(0.9, 2), (0.9, 4), (0.5, 1), (0.9, 3), (0.9, 3), (0.9, 3), (0.9, 3)]
  futures = [eng.submit(engine_lib.Request(PROMPT, n, _options(tau), ar=True, seed=i))
             for i, (tau, n) in enumerate(setups)]
  eng.start()
  try:
    for f, (_, n) in zip(futures, setups):
      assert TOK.decode(f.result(timeout=30).token_ids) == "x" * n  # All complete.
  finally:
    eng.shutdown(drain=False)
  assert log == list(range(len(setups)))


class _CountingPool(_XPool):
  """``_XPool`` that counts forwards over all pools and logs per seed the count at its
  admission. A forward runs only while ``gate`` is set (the engine clears it itself at
  the third admission, so the test queues requests with no forward in between) and no
  pool of ``engine`` is compiling (a long row must not end while another pool builds,
  however the threads are scheduled)."""

  forwards: list
  admitted_at: dict
  gate: threading.Event
  engine: list

  def advance(self):
    assert self.gate.wait(timeout=60)
    building = self.engine[0]._building  # pylint: disable=protected-access
    while any(not job.done() for job in list(building.values())):
      threading.Event().wait(0.001)
    self.forwards[0] += 1
    return super().advance()

  def admit(self, prompt, max_tokens, seed=0):
    self.admitted_at[seed] = self.forwards[0]
    if len(self.admitted_at) == 3:
      self.gate.clear()
    return super().admit(prompt, max_tokens, seed)


def test_a_request_waiting_for_room_closes_one_pool_only(monkeypatch):
  """Two pools at most, four slots: pool A runs one long row, pool B two. A request for a
  third setup waits for room: A (fewest rows) takes no new rows and drains; B, with free
  slots, goes on admitting at once (all pools stopped admitting before)."""
  forwards, admitted_at, gate, engine = [0], {}, threading.Event(), []
  gate.set()
  for name, value in (("forwards", forwards), ("admitted_at", admitted_at), ("gate", gate),
                      ("engine", engine)):
    monkeypatch.setattr(_CountingPool, name, value, raising=False)
  monkeypatch.setattr(pool_lib, "SlotPool", _CountingPool)
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN, slots=4, max_pools=2)
  engine.append(eng)
  eng.start()
  long_tokens = 60
  try:
    first = [eng.submit(engine_lib.Request(PROMPT, long_tokens, _options(tau), ar=True,
                                           seed=seed))
             for seed, tau in ((0, 0.9), (1, 0.8), (2, 0.8))]  # A: one row; B: two.
    while len(admitted_at) < 3 and not any(f.done() for f in first):
      threading.Event().wait(0.001)
    assert len(admitted_at) == 3, admitted_at  # And no forward since: the gate is shut.
    waiting = eng.submit(engine_lib.Request(PROMPT, 1, _options(0.5), ar=True, seed=3))
    more_b = [eng.submit(engine_lib.Request(PROMPT, 1, _options(0.8), ar=True, seed=s))
              for s in (4, 5)]
    released_at = forwards[0]
    gate.set()
    for f in first + [waiting] + more_b:
      assert len(f.result(timeout=60).token_ids)
  finally:
    gate.set()
    eng.shutdown(drain=False)
  # B's new rows start within an iteration or two (two pools: two forwards each), not
  # after A's long row; the waiting request gets its pool once A drained.
  assert all(admitted_at[s] - released_at <= 4 for s in (4, 5)), (released_at, admitted_at)
  assert admitted_at[3] >= admitted_at[0] + long_tokens, admitted_at


# --- chat roles -------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["User", "usr", "wizard", "ipython", ""])
def test_a_role_outside_openais_is_a_400_naming_the_message(role):
  """A chat template renders whatever role it gets (``<|im_start|>User``): a typo gave
  the model a prompt it was never trained on, silently."""
  messages = [{"role": "system", "content": "Be brief."}, {"role": role, "content": "hi"}]
  with pytest.raises(server_lib.protocol.ApiError) as e:
    _parse({"messages": messages}, chat=True)
  assert e.value.status == 400 and e.value.param == "messages[1].role", e.value.message
  assert e.value.message.startswith("messages[1].role") and repr(role) in e.value.message


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool",
                                  "function"])
def test_openais_roles_are_served(role):
  parsed = _parse({"messages": [{"role": role, "content": "hi"}]}, chat=True)
  assert parsed.messages == ({"role": role, "content": "hi"},)


# --- the body size limit ----------------------------------------------------------------------

def test_a_body_over_the_size_limit_is_413_naming_the_limit_and_serving_goes_on():
  eng = _RecordingEngine(TOK)
  r = RunningServer(server_lib.Server(eng, MODEL))
  try:
    limit = 1024 ** 2  # aiohttp's default client_max_size.
    big = json.dumps({"model": MODEL, "prompt": "a" * limit}).encode()
    code, err = post(r, "/v1/completions", big)
    assert code == 413, err
    assert str(limit) in err["error"]["message"], err  # Was "Request Entity Too Large".
    assert err["error"]["type"] == "invalid_request_error"
    code, ok = post(r, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2})
    assert code == 200 and ok["choices"][0]["text"] == "ok"
    assert len(eng.requests) == 1  # Only the small prompt reached the engine.
    np.testing.assert_array_equal(eng.requests[0].prompt_ids, [ord("a")])
  finally:
    r.stop()


# --- a stop string whose last character arrives split between two chunks --------------------

class _ChunkEngine(_RecordingEngine):
  """Streams ``chunks`` (lists of byte-tokenizer ids) one ``on_tokens`` call each, then
  answers with all of them."""

  chunks: list

  def submit(self, req, on_tokens=None):
    self.requests.append(req)
    for c in self.chunks:
      if on_tokens is not None:
        on_tokens(np.asarray(c, np.int32))
    ids = np.concatenate([np.asarray(c, np.int32) for c in self.chunks])
    future = concurrent.futures.Future()
    future.set_result(engine_lib.Result(ids, "length", len(ids), 1, 0.0))
    return future


@pytest.mark.parametrize("answer,split,stop", [
    # The stop's last character is split mid-UTF-8: "问" was streamed before the fix.
    ("答案问：好", len("答案问".encode()) + 1, "问："),
    ("ab\u00e9!", 3, ["b\u00e9", "zz"]),
    ("hello world", 4, "lo w"),  # ASCII, split inside the stop.
])
def test_a_streamed_stop_string_never_leaks_when_a_character_is_split(answer, split, stop):
  data = list(answer.encode())
  eng = _ChunkEngine(TOK)
  eng.chunks = [data[:split], data[split:]]
  r = RunningServer(server_lib.Server(eng, MODEL))
  try:
    body = {"model": MODEL, "prompt": "q", "stop": stop}
    code, full = post(r, "/v1/completions", body)
    assert code == 200 and full["choices"][0]["finish_reason"] == "stop"
    want = full["choices"][0]["text"]
    stops = [stop] if isinstance(stop, str) else stop
    assert want == answer[:min(answer.find(s) for s in stops if s in answer)]  # Reference.
    code, chunks = post(r, "/v1/completions", dict(body, stream=True))
    assert code == 200
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
  finally:
    r.stop()
