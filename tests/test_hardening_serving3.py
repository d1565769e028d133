"""Serving hardening, third pass: what an OpenAI client meets at the edges of the API.

``stream_options.include_usage`` (a last chunk with no choices carries the usage),
one ``created`` per stream, ``GET /v1/models/{model}`` (ids with a slash), tool and
structured-output fields refused rather than ignored, and texts holding a lone
surrogate (valid JSON) refused with a 400 rather than a tokenizer's 500.

The real server and engine over a tiny random model; the texts that never reach the
model go to a server whose engine is not started."""

import http.client
import itertools
import json
import types

import openai
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import protocol
from blockdiff_jax.serving import server as server_lib
from conftest import RunningServer

BLOCK, MAX_LEN, MAX_TOKENS = 8, 32, 6
MODEL = "org/tiny"  # A slash, as in most served model ids.
PROMPT = "<|bos|>hello"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def running(tiny_decoder):
  model, tok, params = tiny_decoder
  eng = engine_lib.Engine(model, params, tok, BLOCK, MAX_LEN, slots=2).start()
  r = RunningServer(server_lib.Server(eng, MODEL, protocol.Defaults(max_tokens=MAX_TOKENS)))
  yield r
  r.stop()


def _client(r):
  return openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)


def _post(r, path, body):
  """(status, parsed body or the SSE chunks); ``body`` bytes go as they are."""
  conn = http.client.HTTPConnection("127.0.0.1", r.port)
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  conn.request("POST", path, data, {"Content-Type": "application/json"})
  resp = conn.getresponse()
  raw = resp.read().decode()
  conn.close()
  if resp.getheader("Content-Type", "").startswith("text/event-stream"):
    return resp.status, [json.loads(line[6:]) for line in raw.split("\n")
                         if line.startswith("data: {")]
  return resp.status, json.loads(raw)


# --- streamed usage and created -----------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_include_usage_ends_the_stream_with_a_usage_chunk(running, chat):
  """As OpenAI's API: the last chunk has no choices and carries the usage (the same as
  unstreamed), every other chunk has ``usage: null``."""
  path, kw = (("/v1/chat/completions", {"messages": MESSAGES}) if chat
              else ("/v1/completions", {"prompt": PROMPT}))
  body = {"model": MODEL, **kw}
  code, full = _post(running, path, body)
  assert code == 200 and full["choices"][0]["finish_reason"] == "length"  # Precondition.
  # The byte tokenizer: <|bos|> plus one token per byte (chat: SFT's rendering, + <|sep|>).
  rendered = "hi" if chat else "hello"
  assert full["usage"]["prompt_tokens"] == 1 + int(chat) + len(rendered.encode())
  assert full["usage"]["completion_tokens"] == MAX_TOKENS
  code, chunks = _post(running, path, dict(body, stream=True,
                                           stream_options={"include_usage": True}))
  assert code == 200
  assert [i for i, c in enumerate(chunks) if not c["choices"]] == [len(chunks) - 1]
  assert chunks[-1]["usage"] == full["usage"]
  assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
  assert chunks[-2]["choices"][0]["finish_reason"] == "length"
  key = (lambda c: c["delta"].get("content") or "") if chat else (lambda c: c["text"])
  answer = (full["choices"][0]["message"]["content"] if chat
            else full["choices"][0]["text"])
  assert "".join(key(c["choices"][0]) for c in chunks[:-1]) == answer
  # The official client reads it where its docs say.
  streamed = list(_client(running).completions.create(
      model=MODEL, prompt=PROMPT, stream=True, stream_options={"include_usage": True}))
  assert [c.usage.completion_tokens for c in streamed if not c.choices] == [MAX_TOKENS]


@pytest.mark.parametrize("body,param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # Not streamed.
    ({"stream": True, "stream_options": "usage"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
])
def test_bad_stream_options_are_400_naming_the_field(running, body, param):
  code, err = _post(running, "/v1/completions", {"model": MODEL, "prompt": PROMPT, **body})
  assert code == 400 and err["error"]["param"] == param


def test_every_chunk_of_a_stream_has_the_same_created(running, monkeypatch):
  """A stream that crosses a second boundary (a clock that ticks at every reading)."""
  monkeypatch.setattr(protocol, "time", types.SimpleNamespace(
      time=itertools.count(1_700_000_000).__next__))
  code, chunks = _post(running, "/v1/chat/completions", {
      "model": MODEL, "messages": MESSAGES, "stream": True})
  assert code == 200 and len(chunks) >= 3  # The role, the text, the finish.
  assert len({c["created"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1


# --- models -------------------------------------------------------------------------------

def test_a_model_is_retrieved_by_its_id(running):
  client = _client(running)
  listed = client.models.list().data
  assert [m.id for m in listed] == [MODEL]
  assert client.models.retrieve(MODEL).model_dump() == listed[0].model_dump()
  with pytest.raises(openai.NotFoundError) as e:
    client.models.retrieve("org/nope")
  assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


# --- fields this server does not implement ------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("field,value", [
    ("tools", [TOOL]), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [TOOL["function"]]), ("function_call", {"name": "f"}),
    ("response_format", {"type": "json_object"})])
def test_tool_and_format_fields_are_refused_not_ignored(running, field, value):
  """A client asking for tool calls or JSON must not get plain text as if it were."""
  code, err = _post(running, "/v1/chat/completions", {
      "model": MODEL, "messages": MESSAGES, field: value})
  assert code == 400 and err["error"]["param"] == field
  assert "not supported" in err["error"]["message"]


def test_tool_and_format_fields_at_their_defaults_are_served(running):
  code, out = _post(running, "/v1/chat/completions", {
      "model": MODEL, "messages": MESSAGES, "max_tokens": 2, "tools": [],
      "tool_choice": "none", "functions": [], "function_call": "auto",
      "response_format": {"type": "text"}})
  assert code == 200 and out["usage"]["completion_tokens"] == 2


# --- texts that are not Unicode -----------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_tokenizer_server():
  """A server with a pretrained-style tokenizer (a Hugging Face one); its engine never
  starts, so only requests refused before decoding are answered."""
  hf = tokenizers.train_bpe(["hello world, hello there"], 300).hf_tokenizer
  tok = tokenizer_lib.PretrainedTokenizer(hf, hf.token_to_id("<|bos|>"),
                                          hf.token_to_id("<|eos|>"),
                                          mask_id=hf.token_to_id("<|mask|>"))
  eng = engine_lib.Engine(None, None, tok, BLOCK, MAX_LEN)
  r = RunningServer(server_lib.Server(eng, MODEL))
  yield r
  eng.start()  # Nothing queued: it stops at once.
  r.stop()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"model": "%s", "prompt": "hi \\ud800"}', "prompt"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\udfff there"}]}',
     "messages[0].content"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "us\\ud800er", "content": "hi"}]}',
     "messages[0].role"),
])
def test_a_lone_surrogate_is_400_naming_the_field(pretrained_tokenizer_server, path, body,
                                                  param):
  """JSON's \\ud800 escape is valid JSON but no Unicode text: Hugging Face tokenizers
  raise a TypeError on it, which must not become a 500."""
  code, err = _post(pretrained_tokenizer_server, path, body % MODEL.encode())
  assert code == 400 and err["error"]["param"] == param
  assert "surrogate" in err["error"]["message"]
