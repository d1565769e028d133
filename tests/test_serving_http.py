"""The HTTP server on 127.0.0.1 with a tiny random model: the official openai client,
streaming, concurrency (batched answers equal each request alone) and error handling."""

import concurrent.futures
import json
import socket
import threading
import urllib.error
import urllib.request

import openai
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.model import build
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from blockdiff_jax.serving import protocol
from blockdiff_jax.serving import server as server_lib
from conftest import RunningServer

MAX_LEN = 64
BLOCK = 8
MODEL = "tiny"
EXTRA = {"policy": "threshold", "threshold": 0.05}


@pytest.fixture(scope="module")
def running():
  c = config_lib.base_config()
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.moe.expert_dim = 32
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=3, queue_size=32).start()
  srv = server_lib.Server(eng, MODEL, protocol.Defaults(max_tokens=12))
  r = RunningServer(srv)
  yield r
  r.stop()


def _client(r):
  return openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)


def _post(r, path, data: bytes, content_type: str = "application/json"):
  req = urllib.request.Request(r.url + path, data=data,
                               headers={"Content-Type": content_type})
  try:
    with urllib.request.urlopen(req) as resp:
      return resp.status, json.loads(resp.read()), dict(resp.headers)
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read()), dict(e.headers)


def test_models_and_health(running):
  c = _client(running)
  assert [m.id for m in c.models.list().data] == [MODEL]
  with urllib.request.urlopen(running.url + "/health") as resp:
    assert json.loads(resp.read())["status"] == "ok"


@pytest.mark.parametrize("policy", ["threshold", "ar"])
def test_completion_stream_equals_non_stream(running, policy):
  c = _client(running)
  extra = dict(EXTRA, policy=policy)
  kw = dict(model=MODEL, prompt="<|bos|>sort: 3 1 2<|sep|>", max_tokens=20, temperature=0,
            extra_body=extra)
  full = c.completions.create(**kw)
  u = full.usage.model_dump()
  assert u["prompt_tokens"] > 0 and u["nfe"] >= 1
  assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
  assert u["tpf"] > 0
  assert full.choices[0].finish_reason in ("stop", "length")
  chunks = list(c.completions.create(stream=True, **kw))
  text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
  assert text == full.choices[0].text
  assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
  if len(full.choices[0].text) > BLOCK:
    # Tokens go out as they are final (block by block, or token by token for AR).
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) > 1


def test_chat_stream_equals_non_stream(running):
  c = _client(running)
  kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16,
            temperature=0, extra_body=EXTRA)
  full = c.chat.completions.create(**kw)
  assert full.choices[0].message.role == "assistant"
  chunks = list(c.chat.completions.create(stream=True, **kw))
  text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
  assert text == full.choices[0].message.content
  assert full.usage.model_dump()["nfe"] >= 1


def test_stop_string_cuts_the_text(running):
  c = _client(running)
  kw = dict(model=MODEL, prompt="<|bos|>add: 1+2<|sep|>", max_tokens=24, temperature=0,
            extra_body=EXTRA)
  full = c.completions.create(**kw).choices[0].text
  # Greedy on a fixed-seed model: deterministic, so a precondition, never a skip.
  assert len(full) >= 4, f"the model ended too early to pick a stop string: {full!r}"
  stop = full[2:4]
  cut = c.completions.create(stop=[stop], **kw).choices[0]
  assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
  streamed = "".join(ch.choices[0].text for ch in c.completions.create(
      stop=[stop], stream=True, **kw) if ch.choices)
  assert streamed == cut.text


@pytest.mark.parametrize("policy", ["threshold", "ar"])
def test_concurrent_greedy_equal_alone(running, policy):
  c = _client(running)
  prompts = ["<|bos|>a", "<|bos|>sort: 9 8 7 6 5<|sep|>", "<|bos|>xy",
             "<|bos|>add: 123+456=579; 1+1<|sep|>", "<|bos|>q", "<|bos|>hello world"]
  extra = dict(EXTRA, policy=policy)

  def ask(i):
    return c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6 + 3 * i,
                                temperature=0, extra_body=extra).choices[0].text

  alone = [ask(i) for i in range(len(prompts))]
  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    together = list(pool.map(ask, range(len(prompts))))
  assert together == alone


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "nope", "prompt": "<|bos|>a"}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "prompt": "<|bos|>" + "x" * 100}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a", "max_tokens": -3}).encode(), 400,
     "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a", "policy": "magic"}).encode(), 400,
     "policy"),
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a", "temperature": "hot"}).encode(), 400,
     "temperature"),
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a", "sub_block_size": 3}).encode(), 400,
     "sub_block_size"),
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a<|nosuch|>"}).encode(), 400, "prompt"),
    # ISD needs a token-shifted model; this one is not.
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a", "policy": "isd"}).encode(), 400,
     "policy"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(running, body, status, param):
  code, err, _ = _post(running, "/v1/completions", body)
  assert code == status
  assert err["error"]["param"] == param and err["error"]["message"]
  ok = _client(running).completions.create(model=MODEL, prompt="<|bos|>a", max_tokens=4,
                                           extra_body=EXTRA)
  assert ok.usage.completion_tokens <= 4


def test_chat_over_long_names_messages(running):
  code, err, _ = _post(running, "/v1/chat/completions", json.dumps(
      {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200}]}).encode())
  assert code == 400 and err["error"]["param"] == "messages"


@pytest.mark.parametrize("body,content_type", [
    (json.dumps({"model": MODEL, "prompt": "<|bos|>a"}).encode(),
     "application/json; charset=nosuch"),
    (b"[" * 100000 + b"]" * 100000, "application/json"),  # Too deep for the parser.
], ids=["unknown_charset", "too_deep"])
def test_malformed_bodies_are_400(running, body, content_type):
  code, err, _ = _post(running, "/v1/completions", body, content_type)
  assert code == 400 and "not valid JSON" in err["error"]["message"]


def test_wrong_method_is_405_with_allow(running):
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(running.url + "/v1/completions")  # A GET.
  assert e.value.code == 405 and e.value.headers["Allow"] == "POST"
  assert json.loads(e.value.read())["error"]["message"]


def test_only_length_errors_are_context_length_exceeded(running):
  def error(prompt):
    code, err, _ = _post(running, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": prompt}).encode())
    assert code == 400 and err["error"]["param"] == "prompt"
    return err["error"]["code"]
  assert error("<|bos|><|mask|>") is None  # The MASK token is no length error.
  assert error("<|bos|>" + "x" * 100) == "context_length_exceeded"


def test_chat_errors_name_the_chat_fields(running):
  def param(**body):
    code, err, _ = _post(running, "/v1/chat/completions", json.dumps(
        {"model": MODEL, **body}).encode())
    assert code == 400
    return err["error"]["param"], err["error"]["message"]
  # Special-token names in a message are text, not an error: only its length is here.
  assert param(messages=[{"role": "user", "content": "<|nosuch|>" * 10}])[0] == "messages"
  field, message = param(messages=[{"role": "user", "content": "hi"}],
                         max_completion_tokens=1000)
  assert field == "max_completion_tokens" and message.startswith(field)


def test_sampling_without_a_seed_draws_a_fresh_one(running):
  c = _client(running)

  def ask(**kw):
    return c.completions.create(model=MODEL, prompt="<|bos|>hello", max_tokens=8,
                                temperature=1.0, extra_body={"policy": "ar"},
                                **kw).choices[0].text
  assert len({ask() for _ in range(3)}) > 1
  assert ask(seed=5) == ask(seed=5)


def test_a_stop_string_ends_decoding(running):
  """Decoding ends at the stop string (fewer forwards); the tokens counted are those
  generated, within max_tokens."""
  c = _client(running)
  kw = dict(model=MODEL, prompt="<|bos|>hello world", max_tokens=20, temperature=0,
            extra_body={"policy": "ar"})
  full = c.completions.create(**kw)
  text = full.choices[0].text
  # A character first seen before the last one: decoding can end before max_tokens.
  i = next((i for i in range(1, len(text) - 1)
            if text[i] != "\ufffd" and text[i] not in text[:i]), None)
  # Greedy on a fixed-seed model: deterministic, so a precondition, never a skip.
  assert full.choices[0].finish_reason == "length" and i is not None, (
      f"the model ended too early to pick a stop string: {text!r}")
  cut = c.completions.create(stop=[text[i]], **kw)
  assert cut.choices[0].text == text[:i] and cut.choices[0].finish_reason == "stop"
  used = cut.usage.model_dump()
  assert used["nfe"] < full.usage.model_dump()["nfe"]
  assert i <= used["completion_tokens"] <= full.usage.completion_tokens
  chunks = list(c.completions.create(stop=[text[i]], stream=True, **kw))
  assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text[:i]
  assert chunks[-1].usage.model_dump()["nfe"] == used["nfe"]


def _tiny():
  c = config_lib.base_config()
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.moe.expert_dim = 32
  model, tok = build.build_model(c)
  return model, tok, build.init_params(model, 0)


def test_full_queue_is_429_with_retry_after():
  model, tok, params = _tiny()
  # Never started: the one queued request stays, so the next is refused.
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=1, queue_size=1)
  r = RunningServer(server_lib.Server(eng, MODEL))
  try:
    eng.submit(engine_lib.Request(tok.encode("a"), 1, protocol.parse_request(
        {"model": MODEL, "prompt": "a"}, MODEL, False, tok, BLOCK, tok.mask_id, tok.eos_id,
        protocol.Defaults()).options))
    code, err, headers = _post(r, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "<|bos|>a"}).encode())
    assert code == 429 and int(headers["Retry-After"]) >= 1
    assert err["error"]["type"] == "rate_limit_error"
  finally:
    eng.start()
    r.stop()


def test_time_limit_is_504_and_disconnect_frees_the_queue():
  model, tok, params = _tiny()
  # The engine is not started, so nothing is decoded: the limit is always reached.
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=1, queue_size=4)
  r = RunningServer(server_lib.Server(eng, MODEL, request_timeout_s=0.2))
  try:
    code, err, _ = _post(r, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "<|bos|>a"}).encode())
    assert code == 504 and err["error"]["type"] == "timeout_error"
    # A client that disconnects while queued: its request leaves the queue.
    r.server.timeout = 1e9
    body = json.dumps({"model": MODEL, "prompt": "<|bos|>a", "stream": False}).encode()
    sock = socket.create_connection(("127.0.0.1", r.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(2000):  # Bounded: until the request is queued.
      if any(not p.future.cancelled() for p in list(eng._queue)):  # pylint: disable=protected-access
        break
      threading.Event().wait(0.01)
    sock.close()
    for _ in range(2000):  # Bounded: until the server saw the disconnect.
      if all(p.future.cancelled() for p in list(eng._queue)):  # pylint: disable=protected-access
        break
      threading.Event().wait(0.01)
    assert all(p.future.cancelled() for p in list(eng._queue))  # pylint: disable=protected-access
  finally:
    eng.start()
    r.stop()
  assert eng.admitted == 0  # Nothing that left was decoded.


def test_shutdown_drains_requests_in_flight():
  model, tok, params = _tiny()
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=1, queue_size=8)
  r = RunningServer(server_lib.Server(eng, MODEL))
  body = json.dumps({"model": MODEL, "prompt": "<|bos|>ab", "max_tokens": 8,
                     **EXTRA}).encode()
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = [pool.submit(_post, r, "/v1/completions", body) for _ in range(3)]
    for _ in range(100000):  # Bounded: until all three wait in the (not started) engine.
      if eng.queued == 3 or any(f.done() for f in futures):
        break
      threading.Event().wait(0.01)
    assert eng.queued == 3
    r.stop()  # Graceful: the engine drains the queue before the server closes.
    answers = [f.result() for f in futures]
  assert [a[0] for a in answers] == [200] * 3
  assert len({a[1]["choices"][0]["text"] for a in answers}) == 1
  assert eng.admitted == 3


def test_disconnect_mid_stream_frees_the_slot(monkeypatch):
  model, tok, params = _tiny()
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=1, queue_size=8)
  real = pool_lib.SlotPool.advance

  def slow_advance(pool):  # Slow forwards: the stream outlives the client by far.
    threading.Event().wait(0.02)
    return real(pool)
  monkeypatch.setattr(pool_lib.SlotPool, "advance", slow_advance)
  r = RunningServer(server_lib.Server(eng.start(), MODEL))
  try:
    body = json.dumps({"model": MODEL, "prompt": "<|bos|>a", "max_tokens": MAX_LEN - 2,
                       "stream": True, "policy": "threshold", "threshold": 1.0}).encode()
    sock = socket.create_connection(("127.0.0.1", r.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data: {" not in got:  # The first streamed chunk: the request holds the slot.
      got += sock.recv(4096)
    assert eng.running == 1
    sock.close()
    for _ in range(100000):  # Bounded: until the server saw the disconnect.
      if eng.running == 0:
        break
      threading.Event().wait(0.01)
    assert eng.running == 0 and eng.retired == 1  # Freed mid-decode, not finished.
    ok = _client(r).completions.create(model=MODEL, prompt="<|bos|>a", max_tokens=4,
                                       extra_body=EXTRA)
    assert ok.usage.completion_tokens <= 4  # The freed slot serves the next request.
  finally:
    r.stop()


def test_isd_over_http_equals_ar():
  """A token-shifted model served by ISD (policy isd): the same text as AR, fewer forwards
  never more than AR's."""
  model, tok, params = _tiny()
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2).start()
  r = RunningServer(server_lib.Server(eng, MODEL, protocol.Defaults(max_tokens=12),
                                 token_shift=True))
  try:
    c = _client(r)
    kw = dict(model=MODEL, prompt="<|bos|>sort: 3 1 2<|sep|>", max_tokens=20, temperature=0)
    ar = c.completions.create(extra_body={"policy": "ar"}, **kw)
    for stride in (2, 4):
      isd = c.completions.create(extra_body={"policy": "isd", "isd_stride": stride}, **kw)
      assert isd.choices[0].text == ar.choices[0].text
      assert isd.usage.model_dump()["nfe"] <= ar.usage.model_dump()["nfe"]
      chunks = list(c.completions.create(
          stream=True, extra_body={"policy": "isd", "isd_stride": stride}, **kw))
      assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ar.choices[0].text
    code, err, _ = _post(r, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "<|bos|>a", "policy": "isd", "isd_stride": 1}).encode())
    assert code == 400 and err["error"]["param"] == "isd_stride"
  finally:
    r.stop()
