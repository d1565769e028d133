"""Serving hardening, sixth pass: a decoder compile whose client left must not hold a
pool's place for good, and request fields the server would silently ignore (a typo in a
decoder option, completions' ``logprobs: 0``, ``max_completion_tokens`` on completions,
``threshold`` beside ``policy_value``) are refused naming the field, as OpenAI's API
refuses an unrecognized argument. ``top_k`` (vLLM's extension) reaches the sampler.

References: a request for a fresh decoder answered by the engine at all (its tokens
are the fake pool's fixed answer), the field names as sent, and ``policies.Sampling``
built by hand. No model: the engine runs over a fake pool, the server over a recording
engine.
"""

import threading
import time

import numpy as np
import openai
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from blockdiff_jax.serving import protocol
from blockdiff_jax.serving import server as server_lib
from conftest import FakeSlotPool
from conftest import RunningServer
from test_hardening_serving3 import _post as post
from test_hardening_serving5 import _RecordingEngine
import test_serving_hardening as serving_tests

TOK = tokenizers.ByteTokenizer()
BLOCK, MAX_LEN = 8, 64
PROMPT = np.array([TOK.bos_id, ord("a")], np.int32)
MESSAGES = [{"role": "user", "content": "hi"}]


# --- the engine: a compile nobody collects -------------------------------------------------

class _XPool(FakeSlotPool):
  """Each forward makes one more "x" final in every busy row."""

  def advance(self):
    view = pool_lib.HostView(done=np.zeros(self.slots, bool),
                             final=np.zeros(self.slots, np.int32),
                             nfe=np.zeros(self.slots, np.int32),
                             tokens=np.zeros((self.slots, self.width), np.int32))
    for slot, row in self.rows.items():
      if self.occupied[slot]:
        row[2] = min(row[2] + 1, row[1])
        start, n = row[0], row[2]
        view.tokens[slot, start:start + n] = ord("x")
        view.final[slot], view.nfe[slot], view.done[slot] = start + n, n, n >= row[1]
    return view


def _options(tau):
  return layout.DecodeOptions(block_size=BLOCK, mask_id=TOK.mask_id, eos_id=TOK.eos_id,
                              policy=policies.Threshold(tau))


@pytest.mark.parametrize("build_fails", [False, True])
def test_a_compile_whose_client_left_does_not_block_new_decoders(monkeypatch, build_fails):
  """A client that leaves while its new decoder compiles: the finished (or failed) build
  was kept as "compiling" for good, so with every pool place taken no other new decoder
  was ever built and its requests waited until their time limit."""
  compiling, release = threading.Event(), threading.Event()

  def make(model, params, dec, *args):
    if dec.options.policy.tau == 0.5:  # The abandoned decoder: slow, maybe failing.
      compiling.set()
      assert release.wait(timeout=30)
      if build_fails:
        raise RuntimeError("compile failed")
    return _XPool(model, params, dec, *args)
  monkeypatch.setattr(pool_lib, "SlotPool", make)
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN, slots=1, max_pools=1).start()
  try:
    gone = eng.submit(engine_lib.Request(PROMPT, 3, _options(0.5)))
    assert compiling.wait(timeout=20)
    gone.cancel()  # The client disconnects (or times out) during the compile.
    release.set()
    deadline = time.monotonic() + 20
    while any(not j.done() for j in eng._building.values()):  # pylint: disable=protected-access
      assert time.monotonic() < deadline
      time.sleep(0.01)
    # A time limit: before, the request waited for it in the queue (and the worker spun).
    new = eng.submit(engine_lib.Request(PROMPT, 3, _options(0.7),
                                        deadline=time.monotonic() + 10))
    assert TOK.decode(new.result(timeout=20).token_ids) == "xxx"
    # A made pool serves its decoder's next request; a failed build is built again,
    # and fails the request that now asks.
    again = eng.submit(engine_lib.Request(PROMPT, 2, _options(0.5),
                                          deadline=time.monotonic() + 10))
    if build_fails:
      with pytest.raises(RuntimeError, match="compile failed"):
        again.result(timeout=20)
    else:
      assert TOK.decode(again.result(timeout=20).token_ids) == "xx"
  finally:
    release.set()
    eng.shutdown(drain=False)


# --- fields the server would ignore --------------------------------------------------------

def _parse(body, chat=False):
  base = {"messages": MESSAGES} if chat else {"prompt": "a"}
  return serving_tests._parse(dict(base, **body), chat)  # pylint: disable=protected-access


def _error(body, chat=False) -> protocol.ApiError:
  with pytest.raises(protocol.ApiError) as e:
    _parse(body, chat)
  assert e.value.status == 400
  return e.value


@pytest.mark.parametrize("chat,field,value,hint", [
    (False, "threshhold", 0.5, "threshold"),  # A typo: the default threshold ran.
    (True, "polciy", "ar", "policy"),
    (False, "sub_block", 4, "sub_block_size"),
    (False, "max_completion_tokens", 3, "max_tokens"),  # Chat's name, on completions.
    (True, "temprature", 1.0, "temperature"),
    (False, "messages", MESSAGES, None),  # A chat body posted to completions.
])
def test_an_unrecognized_field_is_a_400_naming_it(chat, field, value, hint):
  e = _error({field: value}, chat)
  assert e.param == field and "unrecognized" in e.message, e.message
  if hint is not None:
    assert f"did you mean {hint!r}" in e.message, e.message


def test_known_fields_that_change_nothing_are_served_as_without_them():
  plain = _parse({"temperature": 0.7, "seed": 3}, chat=True)
  extra = _parse({"temperature": 0.7, "seed": 3, "user": "u1", "metadata": {"k": "v"},
                  "store": False, "service_tier": "auto", "parallel_tool_calls": True},
                 chat=True)
  assert extra == plain


@pytest.mark.parametrize("body", [
    {"logprobs": 0},  # OpenAI: the sampled tokens' log probabilities, no alternatives.
    {"logprobs": 2},
])
def test_completions_logprobs_counts_are_refused(body):
  e = _error(body)
  assert e.param == "logprobs" and "not supported" in e.message, e.message


def test_logprobs_off_is_served():
  """Chat's logprobs is a boolean (false, or the 0 lenient parsers read as false);
  completions' off is null or false."""
  want = _parse({}, chat=True)
  assert _parse({"logprobs": False}, chat=True) == want
  assert _parse({"logprobs": 0, "top_logprobs": 0}, chat=True) == want
  assert _parse({"logprobs": False}) == _parse({})


def test_threshold_and_policy_value_together_are_refused():
  """Before, ``threshold`` silently won and ``policy_value`` was ignored."""
  e = _error({"threshold": 0.9, "policy_value": 0.3})
  assert e.param == "policy_value", e.message
  assert _parse({"policy_value": 0.3}).options.policy == policies.Threshold(0.3)


@pytest.mark.parametrize("top_k,want", [(5, 5), (0, 0), (-1, 0), (None, 0)])
def test_top_k_reaches_the_sampler(top_k, want):
  p = _parse({"temperature": 0.8, "top_p": 0.9, "top_k": top_k})
  assert p.options.sampling == policies.Sampling(0.8, want, 0.9)


@pytest.mark.parametrize("top_k", [-2, 1.5, True])
def test_a_bad_top_k_is_a_400(top_k):
  assert _error({"top_k": top_k}).param == "top_k"


def test_over_http_a_typo_is_a_400_and_the_sdk_request_is_served():
  eng = _RecordingEngine(TOK)
  r = RunningServer(server_lib.Server(eng, "m"))
  try:
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
      client.completions.create(model="m", prompt="<|bos|>a", max_tokens=2,
                                extra_body={"threshhold": 0.5})
    assert e.value.body["param"] == "threshhold"
    assert not eng.requests  # Nothing was decoded.
    out = client.completions.create(model="m", prompt="<|bos|>a", max_tokens=2,
                                    temperature=0.5, user="me",
                                    extra_body={"threshold": 0.5, "top_k": 3})
    assert out.choices[0].text == "ok"
    opts = eng.requests[-1].options
    assert (opts.policy, opts.sampling.top_k) == (policies.Threshold(0.5), 3)
    code, body = post(r, "/v1/chat/completions",
                      {"model": "m", "messages": MESSAGES, "max_tokens": 2, "echo": True})
    assert code == 400 and body["error"]["param"] == "echo", body
  finally:
    r.stop()


@pytest.mark.parametrize("body,field", [
    ({"sub_block_size": 3}, "sub_block_size"),  # Does not divide the block.
    ({"sub_block_size": 2, "max_steps_per_block": 1}, "max_steps_per_block"),  # < sub-blocks.
    ({"max_steps_per_block": -1}, "max_steps_per_block"),
])
def test_a_decoder_option_error_names_its_own_field(body, field):
  assert _error(body).param == field


def test_a_server_step_cap_below_the_requested_sub_blocks_is_raised_not_a_400():
  """The request never sent max_steps_per_block: the server's 4 cannot be kept over 8
  sub-blocks of 1, so the nearest cap that can (8) is used; a cap it sends is its own."""
  parse = lambda body: protocol.parse_request(
      dict({"model": "m", "prompt": "a"}, **body), "m", False, TOK, BLOCK, TOK.mask_id,
      TOK.eos_id, protocol.Defaults(max_steps_per_block=4))
  assert parse({"sub_block_size": 1}).options.max_steps_per_block == BLOCK
  assert parse({"sub_block_size": 2}).options.max_steps_per_block == 4  # Kept: 4 subs.
  assert parse({}).options.max_steps_per_block == 4
  with pytest.raises(protocol.ApiError) as e:
    parse({"sub_block_size": 1, "max_steps_per_block": 4})
  assert e.value.param == "max_steps_per_block"


@pytest.mark.parametrize("body,ok", [
    ({"prompt_cache_retention": "24h"}, True), ({"prompt_cache_options": {}}, True),
    ({"min_p": 0.0}, True), ({"repetition_penalty": 1.0}, True),
    ({"min_p": 0.1}, False), ({"repetition_penalty": 1.2}, False),
    ({"moderation": {"x": 1}}, False)])
def test_sdk_and_vllm_fields_pass_at_their_no_op_values(body, ok):
  if ok:
    _parse(body)
  else:
    assert _error(body).param == next(iter(body))
