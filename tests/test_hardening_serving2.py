"""Serving hardening, second pass: the body's Content-Type, stop strings inside a block
(streamed and not), usage and finish_reason at the edges of max_tokens, disconnects,
and requests with different sampling setups decoding side by side.

Most tests run the real server and engine over a fake slot pool (no model) that commits
``ANSWER`` block by block, as the block decoder does; one runs a tiny random model."""

import concurrent.futures
import http.client
import json
import socket
import threading

import numpy as np
import openai
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from blockdiff_jax.serving import protocol
from blockdiff_jax.serving import server as server_lib
from conftest import FakeSlotPool
from conftest import RunningServer

TOK = tokenizers.ByteTokenizer()
REAL_SLOT_POOL = pool_lib.SlotPool
BLOCK, MAX_LEN = 8, 96
MODEL = "m"
PROMPT = "<|bos|>a"  # Two tokens: the answer starts 2 positions into the first block.
# What every row of the fake pool generates (ASCII: one token per character).
ANSWER = "hello world, this fake answer goes on" + " and on" * 10 + " until the end!"


class _BlockPool(FakeSlotPool):
  """A pool without a model: each forward makes the next block of ``ANSWER`` final in
  every busy row (a committed block, as block diffusion does)."""

  gate: threading.Event | None = None

  def advance(self):
    if _BlockPool.gate is not None:  # A device that computes only when the test says so.
      _BlockPool.gate.wait()  # The test always sets it (in a finally).
    answer = TOK.encode(ANSWER)
    view = pool_lib.HostView(done=np.ones(self.slots, bool),
                             final=np.zeros(self.slots, np.int32),
                             nfe=np.zeros(self.slots, np.int32),
                             tokens=np.zeros((self.slots, self.width), np.int32))
    for slot, row in self.rows.items():
      start, max_tokens, n = row
      if self.occupied[slot] and n < max_tokens:  # Up to the next block boundary.
        n = row[2] = min(max_tokens, (start + n) // BLOCK * BLOCK + BLOCK - start)
      view.tokens[slot, start:start + n] = answer[:n]
      view.final[slot], view.nfe[slot] = start + n, -(-(start + n) // BLOCK)
      view.done[slot] = n >= max_tokens
    return view


@pytest.fixture(scope="module")
def fake():
  """(a server over an engine of fake block pools, the pools it made)."""
  pools = []

  def make(*args, **kw):
    pools.append(_BlockPool(*args, **kw))
    return pools[-1]
  patch = pytest.MonkeyPatch()
  patch.setattr(pool_lib, "SlotPool", make)
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN, slots=2).start()
  r = RunningServer(server_lib.Server(eng, MODEL, protocol.Defaults(max_tokens=12)))
  yield r, pools
  r.stop()
  patch.undo()


def _post(r, path, body, content_type="application/json"):
  """(status, parsed body or SSE chunks, headers); ``content_type`` None sends none."""
  conn = http.client.HTTPConnection("127.0.0.1", r.port)
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  conn.request("POST", path, data, {} if content_type is None
               else {"Content-Type": content_type})
  resp = conn.getresponse()
  raw = resp.read().decode()
  conn.close()
  if resp.getheader("Content-Type", "").startswith("text/event-stream"):
    out = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
  else:
    out = json.loads(raw)
  return resp.status, out, dict(resp.getheaders())


# --- the body's Content-Type --------------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "text/plain; charset=nosuch", "application/xml"])
def test_a_body_declared_other_than_json_is_415(fake, content_type):
  r, _ = fake
  code, err, headers = _post(r, "/v1/completions", {"model": MODEL, "prompt": PROMPT},
                             content_type)
  assert code == 415 and headers["Accept-Post"] == "application/json"
  assert err["error"]["code"] == "unsupported_media_type"
  assert "Content-Type must be application/json" in err["error"]["message"]
  assert repr(content_type) in err["error"]["message"]


@pytest.mark.parametrize("content_type", [
    "application/json", "Application/JSON; charset=UTF-8", None, ""])
def test_a_json_body_declared_so_or_undeclared_is_served(fake, content_type):
  r, _ = fake
  code, out, _ = _post(r, "/v1/chat/completions", {
      "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                       content_type)
  assert code == 200 and out["choices"][0]["message"]["content"] == ANSWER[:5]


# --- stop strings inside a block ----------------------------------------------------------

# Stop strings starting at every offset of the second and third blocks (the answer's
# positions 6..21), some spanning a block boundary, one found only with the second string.
STOPS = [(ANSWER[i:i + n],) for i in range(6, 22) for n in (1, 3, 7)] + [("zzz", "s fake")]


@pytest.mark.parametrize("chat", [False, True])
def test_a_stop_string_inside_a_block_never_streams_past_it(fake, chat):
  """A whole block turns final at once, text past the stop string included: the text ends
  right before the stop string, and no streamed delta holds anything after it."""
  r, _ = fake
  path = "/v1/chat/completions" if chat else "/v1/completions"
  prompt = ({"messages": [{"role": "user", "content": "hi"}]} if chat
            else {"prompt": PROMPT})
  for stop in STOPS:
    cut = min(i for i in (ANSWER.find(s) for s in stop) if i >= 0)
    want = ANSWER[:cut]
    body = {"model": MODEL, "max_tokens": 60, "stop": list(stop), **prompt}
    code, out, _ = _post(r, path, body)
    assert code == 200
    choice = out["choices"][0]
    assert (choice["message"]["content"] if chat else choice["text"]) == want, stop
    assert choice["finish_reason"] == "stop"
    # The tokens up to the one that completes the stop string (one token per character).
    done_at = min(ANSWER.find(s) + len(s) for s in stop if s in ANSWER)
    assert out["usage"]["completion_tokens"] == done_at
    code, chunks, _ = _post(r, path, dict(body, stream=True))
    assert code == 200
    deltas = [(ch["choices"][0]["delta"].get("content") if chat
               else ch["choices"][0]["text"]) or "" for ch in chunks]
    seen = ""
    for delta in deltas:
      seen += delta
      assert want.startswith(seen), (stop, deltas)  # Never past the cut.
    assert seen == want and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == out["usage"]


# --- usage, n, max_tokens, finish_reason --------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 7, 8, 60, MAX_LEN - 2])
def test_usage_and_finish_reason_at_max_tokens(fake, max_tokens):
  r, _ = fake
  want = ANSWER[:max_tokens]
  code, out, _ = _post(r, "/v1/completions", {"model": MODEL, "prompt": PROMPT,
                                               "max_tokens": max_tokens})
  assert code == 200
  choice = out["choices"][0]
  assert choice["text"] == want and choice["finish_reason"] == "length"
  assert out["usage"]["prompt_tokens"] == 2
  assert out["usage"]["completion_tokens"] == len(want)
  assert out["usage"]["total_tokens"] == 2 + len(want)


def test_chat_usage_counts_the_rendered_prompt(fake):
  r, _ = fake
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hé"}]
  code, out, _ = _post(r, "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                    "max_tokens": 4})
  # SFT's rendering: <|bos|>, one token per UTF-8 byte of the contents, <|sep|>.
  rendered = "be brief\nhé"
  assert code == 200 and out["usage"]["prompt_tokens"] == 2 + len(rendered.encode())
  assert out["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("body,param,code", [
    ({"n": 2}, "n", None), ({"n": 0}, "n", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": MAX_LEN - 1}, "max_tokens", "context_length_exceeded"),
    ({"max_tokens": 10**30}, "max_tokens", "context_length_exceeded"),
    ({"max_tokens": "5"}, "max_tokens", None), ({"model": 5}, "model", None),
    ({"prompt": ["a", "b"]}, "prompt", None), ({"stop": [1]}, "stop[0]", None),
])
def test_bad_values_are_400_naming_the_field(fake, body, param, code):
  r, _ = fake
  status, err, _ = _post(r, "/v1/completions", {"model": MODEL, "prompt": PROMPT, **body})
  assert status == 400 and err["error"]["param"] == param and err["error"]["code"] == code


def test_chat_image_parts_are_400_naming_the_part(fake):
  r, _ = fake
  status, err, _ = _post(r, "/v1/chat/completions", {"model": MODEL, "messages": [
      {"role": "user", "content": "hi"},
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
  assert status == 400 and err["error"]["param"] == "messages[1].content[0].type"


def test_models_lists_the_served_model(fake):
  r, _ = fake
  conn = http.client.HTTPConnection("127.0.0.1", r.port)
  conn.request("GET", "/v1/models")
  out = json.loads(conn.getresponse().read())
  conn.close()
  assert out["object"] == "list" and [m["id"] for m in out["data"]] == [MODEL]
  assert set(out["data"][0]) == {"id", "object", "created", "owned_by"}
  assert out["data"][0]["object"] == "model" and isinstance(out["data"][0]["created"], int)


def test_a_client_gone_mid_decode_frees_the_slot(fake, monkeypatch):
  """A non-streaming client that disconnects while its request decodes: the slot frees."""
  r, _ = fake
  eng = r.server.engine
  retired = eng.retired
  gate = threading.Event()
  monkeypatch.setattr(_BlockPool, "gate", gate)
  try:
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 60}).encode()
    sock = socket.create_connection(("127.0.0.1", r.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(100000):  # Bounded: until the request holds a slot.
      if eng.running == 1:
        break
      threading.Event().wait(0.005)
    assert eng.running == 1
    sock.close()
    rows = eng._rows  # pylint: disable=protected-access
    for _ in range(100000):  # Bounded: until the server saw the disconnect.
      if all(p.future.cancelled() for ps in list(rows.values()) for p in list(ps.values())):
        break
      threading.Event().wait(0.005)
    gate.set()  # The forward in flight ends; the next iteration retires the row.
    for _ in range(100000):  # Bounded: until the worker freed the slot.
      if eng.running == 0:
        break
      threading.Event().wait(0.005)
    assert eng.running == 0 and eng.retired == retired + 1  # Retired, not finished.
  finally:
    gate.set()


# --- different sampling setups side by side (a tiny random model) -------------------------

def test_concurrent_requests_with_different_sampling_equal_alone(tiny_decoder, monkeypatch):
  """Greedy and sampled requests (other policy, temperature, top_p: another pool; other
  seeds: side by side in one) decoding at the same time: each equals itself alone."""
  model, tok, params = tiny_decoder
  monkeypatch.setattr(pool_lib, "SlotPool", REAL_SLOT_POOL)  # Whatever the fixtures did.
  eng = engine_lib.Engine(model, params, tok, BLOCK, 32, slots=2).start()
  r = RunningServer(server_lib.Server(eng, MODEL))
  try:
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
    greedy = dict(temperature=0, extra_body={"policy": "threshold", "threshold": 0.05})
    sampled = dict(temperature=1.0, top_p=0.9, extra_body={"policy": "ar"})
    asks = [greedy, dict(sampled, seed=3), dict(sampled, seed=4), greedy]
    prompts = ["<|bos|>a", "<|bos|>xy", "<|bos|>xy", "<|bos|>sort: 3 1 2<|sep|>"]

    def ask(i):
      return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12,
                                       **asks[i]).choices[0].text
    alone = [ask(i) for i in range(len(asks))]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
      together = list(pool.map(ask, range(len(asks))))
    assert together == alone
    assert alone[1] != alone[2]  # Same prompt and decoder; the seeds tell them apart.
  finally:
    r.stop()
