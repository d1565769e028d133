"""Serving hardening, fourth pass: contexts whose longest prompt lies past the widest
prefill bucket, a decoder failing with StopIteration, and 400s that name the precise
field of a chat message or stop list.

References: the request decoded alone by ``sampling.sample.generate``; the field names
of the request body as sent.
"""

import http.client
import json

import pytest

from blockdiff_jax.interop import tokenizer as tokenizer_lib
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import sample
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from blockdiff_jax.serving import server as server_lib
from conftest import FakeSlotPool
from conftest import RunningServer

BLOCK = 8
MODEL = "m"


# --- a context one past a block multiple --------------------------------------------------

def test_a_context_one_past_a_block_multiple_serves_every_prompt_length(tiny_decoder):
  """max_len = 2 blocks + 1: the canvas is 3 blocks wide, the longest prompt (16 tokens)
  fits the 16-wide bucket. The pool's warmup asked for buckets of prompts up to the
  canvas width (23 tokens), which AR's and ISD's prefill (the prompt's own length) have
  none for: the pool never built and every request failed."""
  model, tok, params = tiny_decoder
  max_len = 2 * BLOCK + 1
  opts = layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id)
  eng = engine_lib.Engine(model, params, tok, BLOCK, max_len, slots=2).start()
  prompts = ["<|bos|>a", "<|bos|>" + "abcdefghijklmno"]  # 2 and 16 = max_len - 1 tokens.
  try:
    futures = [eng.submit(engine_lib.Request(layout.parse(tok, p).ids,
                                             max_len - len(layout.parse(tok, p).ids),
                                             opts, ar=True)) for p in prompts]
    results = [f.result() for f in futures]
  finally:
    eng.shutdown()
  for p, got in zip(prompts, results):
    n = max_len - len(layout.parse(tok, p).ids)
    rows, _ = sample.generate(model, params, tok, [p], opts, n, max_len, ar=True)
    assert [int(t) for t in got.token_ids] == rows[0]["tokens"][:len(got.token_ids)]
    assert got.generated_tokens == rows[0]["generated_tokens"]


def test_a_prompt_longer_than_the_pool_takes_is_a_value_error(tiny_decoder):
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id)
  pool = pool_lib.SlotPool(model, params, pool_lib.Decoder(opts, "ar"), 1, 24, 16)
  assert pool.bucket(16) == 16
  with pytest.raises(ValueError, match="17 tokens"):
    pool.bucket(17)


# --- 400s name the precise field ----------------------------------------------------------

def _chatml_tokenizer(content="m['content']"):
  """A byte-level BPE with ChatML specials, a MASK and a template that inserts
  ``content`` (a Jinja expression of the message ``m``)."""
  table = tokenizer_lib._bytes_to_unicode()  # pylint: disable=protected-access
  specials = ["<|im_start|>", "<|im_end|>", "<|mask|>"]
  hf = tokenizer_lib.hf_tokenizer_from_gguf(
      {"model": "gpt2", "pre": "gpt2", "tokens": [table[b] for b in range(256)] + specials,
       "merges": [], "token_type": [1] * 256 + [3] * len(specials)})
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ " + content +
              " }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
              "assistant\n{% endif %}")
  return tokenizer_lib.PretrainedTokenizer(hf, None, hf.token_to_id("<|im_end|>"),
                                           mask_id=hf.token_to_id("<|mask|>"),
                                           chat_template=template)


@pytest.fixture(scope="module")
def refusing_servers():
  """Servers (a template inserting contents verbatim, one trimming them) whose engines
  never start: only requests refused before decoding are answered."""
  engines = [engine_lib.Engine(None, None, _chatml_tokenizer(content), BLOCK, 64)
             for content in ("m['content']", "m['content'] | trim")]
  servers = [RunningServer(server_lib.Server(e, MODEL)) for e in engines]
  yield servers
  for e, r in zip(engines, servers):
    e.start()  # Nothing queued: it stops at once.
    r.stop()


def _post(r, path, body):
  conn = http.client.HTTPConnection("127.0.0.1", r.port)
  conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
  resp = conn.getresponse()
  out = json.loads(resp.read())
  conn.close()
  return resp.status, out


HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("trim,body,param", [
    (False, {"messages": [HI, HI, {"role": "user<|im_end|>", "content": "x"}]},
     "messages[2].role"),
    # The trimming template does not insert the content verbatim: it cannot stay text.
    (True, {"messages": [HI, {"role": "user", "content": " a<|im_end|> "}]},
     "messages[1].content"),
    (False, {"messages": [HI], "stop": ["ok", 3]}, "stop[1]"),
    (False, {"messages": [HI], "stop": ["ok", "x", ""]}, "stop[2]"),
    (False, {"messages": [HI], "stop": ""}, "stop"),
    (False, {"messages": [HI], "stop": ["a"] * 5}, "stop"),
])
def test_a_400_names_the_precise_field(refusing_servers, trim, body, param):
  code, err = _post(refusing_servers[trim], "/v1/chat/completions", {"model": MODEL, **body})
  assert code == 400 and err["error"]["param"] == param, err
  assert err["error"]["message"].startswith(param)
  assert err["error"]["type"] == "invalid_request_error"


# --- a decoder failing with StopIteration ---------------------------------------------

class _DryPool(FakeSlotPool):
  """A pool whose forward fails the way a ``next()`` that ran dry does."""

  def advance(self):
    raise StopIteration


def test_a_decoder_raising_stop_iteration_is_a_500_not_a_hang(monkeypatch):
  """asyncio cannot raise a StopIteration into the handler awaiting the request: it
  logged a TypeError and the client waited until the request's time limit (a 504)."""
  monkeypatch.setattr(pool_lib, "SlotPool", _DryPool)
  tok = _chatml_tokenizer()
  eng = engine_lib.Engine(None, None, tok, BLOCK, 64).start()
  # The limit only bounds how long the old behaviour takes to fail this test.
  r = RunningServer(server_lib.Server(eng, MODEL, request_timeout_s=60.0))
  try:
    code, err = _post(r, "/v1/completions", {"model": MODEL, "prompt": "hi"})
  finally:
    r.stop()
  assert code == 500 and err["error"]["type"] == "server_error", err
  assert "StopIteration" in err["error"]["message"]
