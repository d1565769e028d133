"""The OpenAI wire format: request validation and response bodies (no HTTP here).

Validation raises ``ApiError`` naming the offending field (``param``), which the server
turns into an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``.

Request fields: ``model``, ``prompt`` (completions) or ``messages`` (chat; a content is
a string or a list of text parts, joined; a role is one of OpenAI's ``ROLES``),
``max_tokens`` (chat also ``max_completion_tokens``), ``temperature`` (default 0 =
greedy, unlike OpenAI's 1), ``top_p``, ``top_k`` (vLLM's extension; 0 or -1 = all),
``stop`` (a string or up to 4), ``seed``, ``stream``, ``stream_options``
(``include_usage``: as OpenAI, a last chunk with no choices carries the usage, the
others ``usage: null``; without it the finishing chunk carries it),
``n`` (1 only). Decoder options as extra body fields: ``policy`` (threshold | factor |
topk | entropy | margin | l2r | ar | isd), ``policy_value`` (alias ``threshold``),
``sub_block_size``, ``edit_threshold``, ``max_steps_per_block``, ``isd_stride`` (policy
isd: I-DLM's strided decoding, token-shifted models only).

A JSON ``null`` is the field left out. Numbers must be finite (Python's json reads
``NaN`` and ``Infinity``); texts must be Unicode (JSON's ``\\ud800`` escapes a lone
surrogate, which no tokenizer encodes). Without ``seed`` a sampled request draws a fresh
one (as OpenAI's API does); OpenAI fields this server does not implement
(``UNSUPPORTED``: tool calls and ``response_format`` among them) are refused unless they
hold their default; completions' ``logprobs: 0`` too (it asks for the sampled tokens'
log probabilities). A field the endpoint does not read at all is refused (as OpenAI's
API does), so a typo in a decoder option is a 400, not a silent default.
"""

import dataclasses
import difflib
import math
import time
import uuid
from typing import Any

from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies

POLICIES = tuple(sorted(policies.POLICIES)) + ("ar", "isd")
# A seed becomes a jax.random.key: a signed 64-bit integer.
SEED_RANGE = (-2**63, 2**63 - 1)
# Step counts (max_steps_per_block, topk's steps) are traced as int32; no block has
# anywhere near this many positions, so larger values would change nothing.
MAX_STEPS = 2**20
# OpenAI fields not implemented here, with the values that ask for nothing (null is
# always accepted): anything else is refused rather than silently ignored.
UNSUPPORTED = {"echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
               "best_of": (1,), "suffix": ("",), "logit_bias": ({},),
               "presence_penalty": (0,), "frequency_penalty": (0,),
               # Tool calls and structured output: the reply is always plain text.
               "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
               "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
               # Audio, predicted outputs, web search, reasoning: null only.
               "modalities": (["text"],), "audio": (), "prediction": (),
               "web_search_options": (), "reasoning_effort": (), "verbosity": (),
               "moderation": (),
               # vLLM-style sampling extras, accepted at their no-op values.
               "min_p": (0,), "repetition_penalty": (1,)}
# The fields each endpoint reads; any other is refused (as OpenAI's API does), so a typo
# (``threshhold``, ``max_token``) is a 400 naming it, not a silent default. ``IGNORED``:
# bookkeeping fields that change nothing in the answer.
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
           "parallel_tool_calls")
DECODER_FIELDS = ("policy", "policy_value", "threshold", "sub_block_size", "edit_threshold",
                  "max_steps_per_block", "isd_stride")
_COMMON = ("model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
           "stream_options", "n", "top_k") + IGNORED + DECODER_FIELDS
COMPLETION_FIELDS = frozenset(_COMMON + ("prompt",))
CHAT_FIELDS = frozenset(_COMMON + ("messages", "max_completion_tokens"))
# The message roles of OpenAI's chat API.
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ApiError(Exception):
  """An error answered to the client with an HTTP status and an OpenAI error body."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type_: str = "invalid_request_error", code: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param
    self.type, self.code, self.headers = type_, code, headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Server-side defaults of the decoding fields (from the ``sample``/``serve`` config)."""

  policy: str = "threshold"
  policy_value: float = 0.9
  sub_block_size: int = 0
  edit_threshold: float = 0.0
  max_steps_per_block: int = 0
  max_tokens: int = 16
  isd_stride: int = 4
  # The server's decoder KV cache (``sample.kv_cache``): None = full, else hierarchical.
  kv_hierarchy: hierarchical_cache.Hierarchy | None = None


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A validated request: what to decode and how to answer.

  Attributes:
    prompt_text: the prompt (chat: rendered by the template).
    max_tokens: tokens to generate at most (None = the server default, capped to fit).
    options: decoder options.
    ar: AR decoding.
    seed: sampling seed (None = not given: the server draws one).
    stop: stop strings.
    stream: answer by SSE.
    isd_stride: ISD's stride (policy isd); 0 otherwise.
    max_tokens_field: the field that gave ``max_tokens`` (chat may use
      ``max_completion_tokens``), for error messages.
    include_usage: a stream ends with a usage chunk (``stream_options.include_usage``).
    messages: chat: the messages, each content as one text (text parts joined).
  """

  prompt_text: str
  max_tokens: int | None
  options: layout.DecodeOptions
  ar: bool
  seed: int | None
  stop: tuple[str, ...]
  stream: bool
  isd_stride: int = 0
  max_tokens_field: str = "max_tokens"
  include_usage: bool = False
  messages: tuple[dict, ...] = ()


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False,
            lo_open=False):
  v = body.get(name, default)
  if v is None:
    return default
  if integer and isinstance(v, float) and v.is_integer():
    v = int(v)  # 40.0: what a client that writes every number as a float sends.
  ok = isinstance(v, int) if integer else isinstance(v, (int, float))
  if isinstance(v, bool) or not ok:
    raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, "
                   f"got {v!r}", name)
  if isinstance(v, float) and not math.isfinite(v):  # NaN would pass every bound check.
    raise ApiError(400, f"{name} must be a finite number, got {v!r}", name)
  if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
    low = f"{'>' if lo_open else '>='} {lo}"
    bounds = (f"<= {hi}" if lo is None else low if hi is None
              else f"in {'(' if lo_open else '['}{lo}, {hi}]")
    raise ApiError(400, f"{name} must be {bounds}, got {v!r}", name)
  return v


def _unicode(text: str, param: str) -> str:
  """``text``, or a 400 naming ``param`` when it holds a lone surrogate."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ApiError(400, f"{param} must be Unicode text; it holds the lone surrogate "
                   f"{text[e.start]!r} at character {e.start}", param) from e
  return text


def _content_text(content: str | list, i: int) -> str:
  """A message's content as text: a string, or its text parts concatenated (as OpenAI
  joins them; its newer clients send ``[{"type": "text", "text": ...}]`` even for plain
  text). Any other part (an image, audio, a refusal) is a 400 naming its ``type``: this
  server reads text only."""
  if isinstance(content, str):
    return _unicode(content, f"messages[{i}].content")
  texts = []
  for j, part in enumerate(content):
    where = f"messages[{i}].content[{j}]"
    if not isinstance(part, dict):
      raise ApiError(400, f"{where} must be an object {{'type': 'text', 'text': str}}, "
                     f"got {part!r:.60}", where)
    if part.get("type") != "text":
      raise ApiError(400, f"{where}.type must be 'text' (this server reads text only), "
                     f"got {part.get('type')!r:.60}", f"{where}.type")
    if not isinstance(part.get("text"), str):
      raise ApiError(400, f"{where}.text must be a string, got {part.get('text')!r:.60}",
                     f"{where}.text")
    texts.append(_unicode(part["text"], f"{where}.text"))
  return "".join(texts)


def _stream_options(body: dict, stream: bool) -> bool:
  """Whether the stream ends with a usage chunk; OpenAI refuses the field unstreamed."""
  options = body.get("stream_options")
  if options is None:
    return False
  if not stream:
    raise ApiError(400, "stream_options is only allowed when stream is true",
                   "stream_options")
  if not isinstance(options, dict):
    raise ApiError(400, f"stream_options must be an object, got {options!r}",
                   "stream_options")
  include = options.get("include_usage")
  if include is not None and not isinstance(include, bool):
    raise ApiError(400, f"stream_options.include_usage must be a boolean, got {include!r}",
                   "stream_options.include_usage")
  return bool(include)


def _check_fields(body: dict, chat: bool) -> None:
  """Refuses fields the endpoint does not read, and fields that would be silently ignored
  or ask for what this server does not return."""
  # An unimplemented OpenAI field is answered "not supported" on either endpoint.
  known = (CHAT_FIELDS if chat else COMPLETION_FIELDS) | set(UNSUPPORTED)
  unknown = sorted(k for k in body if k not in known)
  if unknown:
    name = unknown[0]
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ApiError(400, f"unrecognized request field {name!r} for "
                   f"{'chat completions' if chat else 'completions'}{hint}", name)
  # Completions' logprobs is a count of alternatives beside the sampled token's own
  # log probability: 0 still asks for the latter (chat's logprobs is a boolean).
  v = body.get("logprobs")
  if not chat and isinstance(v, int) and not isinstance(v, bool):
    raise ApiError(400, f"logprobs is not supported by this server, got {v!r} (any count, "
                   "0 too, returns the sampled tokens' log probabilities)", "logprobs")
  if "threshold" in body and "policy_value" in body:
    raise ApiError(400, "give threshold or its alias policy_value, not both (got "
                   f"{body['threshold']!r} and {body['policy_value']!r})", "policy_value")


def parse_request(body: Any, model_name: str, chat: bool, tokenizer, block_size: int,
                  mask_id: int, eos_id: int, defaults: Defaults,
                  token_shift: bool = False, render_chat=None) -> Parsed:
  """Validates a completions (``chat=False``) or chat request body; raises ApiError."""
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object", None)
  body = {k: v for k, v in body.items() if v is not None}  # null = left out.
  _check_fields(body, chat)
  for name, defaults_ok in UNSUPPORTED.items():
    v = body.get(name)
    if v is not None and not any(v == d and isinstance(v, bool) == isinstance(d, bool)
                                 for d in defaults_ok):
      raise ApiError(400, f"{name} is not supported by this server, got {v!r}", name)
  model = body.get("model")
  if not isinstance(model, str):
    raise ApiError(400, "model is required (a string)", "model")
  if model != model_name:
    raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                   f"{model_name!r}", "model", code="model_not_found")
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise ApiError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
      if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
          or not isinstance(m.get("content"), (str, list))):
        raise ApiError(400, f"messages[{i}] must be {{'role': str, 'content': str or a "
                       "list of text parts}", f"messages[{i}]")
      _unicode(m["role"], f"messages[{i}].role")
      if m["role"] not in ROLES:
        # A template renders any role it is given ("User", "usr"): the model would
        # answer a prompt it was never trained on; OpenAI's API refuses it too.
        raise ApiError(400, f"messages[{i}].role must be one of {list(ROLES)}, got "
                       f"{m['role']!r:.60}", f"messages[{i}].role")
    messages = [dict(m, content=_content_text(m["content"], i))
                for i, m in enumerate(messages)]
    prompt = render_chat(messages)
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
      prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
      raise ApiError(400, "prompt must be a non-empty string (one prompt per request)",
                     "prompt")
    _unicode(prompt, "prompt")
  if _number(body, "n", 1, integer=True) != 1:
    raise ApiError(400, "only n=1 is supported", "n")
  # Chat: max_completion_tokens wins over max_tokens (its deprecated alias); a bad value
  # of either is refused, not ignored.
  max_tokens, name = _number(body, "max_tokens", None, lo=1, integer=True), "max_tokens"
  if chat and "max_completion_tokens" in body:
    name = "max_completion_tokens"
    max_tokens = _number(body, name, None, lo=1, integer=True)
  temperature = float(_number(body, "temperature", 0.0, lo=0, hi=2))
  top_p = float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True))
  # vLLM's extension: -1 (its "off") or 0 = every token.
  top_k = max(0, _number(body, "top_k", 0, lo=-1, integer=True))
  seed = _number(body, "seed", None, *SEED_RANGE, integer=True)
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
  include_usage = _stream_options(body, stream)
  stop = body.get("stop")
  stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
  if not isinstance(stop, (list, tuple)) or len(stop) > 4 or stop == ("",):
    raise ApiError(400, "stop must be a non-empty string or a list of up to 4", "stop")
  for i, s in enumerate(stop):
    if not isinstance(s, str) or not s:
      raise ApiError(400, f"stop[{i}] must be a non-empty string, got {s!r}", f"stop[{i}]")

  # A token-shifted model may be an unadapted causal LM: AR unless the request (or an
  # ISD default) says otherwise.
  one_token_default = defaults.policy in ("ar", "isd")
  policy = body.get("policy", "ar" if token_shift and not one_token_default
                    else defaults.policy)
  if policy not in POLICIES:
    raise ApiError(400, f"policy must be one of {list(POLICIES)}, got {policy!r}", "policy")
  value_field = "threshold" if "threshold" in body else "policy_value"
  value = _number(body, value_field, defaults.policy_value if "policy" not in body
                  or policy == defaults.policy else None,
                  hi=MAX_STEPS if policy == "topk" else None)
  sub = _number(body, "sub_block_size", defaults.sub_block_size, lo=0, integer=True)
  edit = _number(body, "edit_threshold", defaults.edit_threshold, lo=0, hi=1)
  steps = _number(body, "max_steps_per_block", defaults.max_steps_per_block, lo=0,
                  hi=MAX_STEPS, integer=True)
  if "max_steps_per_block" not in body and sub and steps and steps < block_size // sub:
    # The server's cap, below the sub-blocks this request asks for: each takes one step
    # at least, so the nearest cap that can be kept (a 400 for a field never sent).
    steps = block_size // sub if block_size % sub == 0 else steps
  stride = 0
  if policy == "isd":
    if not token_shift:
      raise ApiError(400, "policy isd needs a token-shifted model (an adapted AR model)",
                     "policy")
    stride = int(_number(body, "isd_stride", defaults.isd_stride, lo=2, hi=64,
                         integer=True))
  one_token = policy in ("ar", "isd")  # Decoders without a block policy.
  try:
    policy_obj = policies.make_policy("threshold" if one_token else policy,
                                      None if one_token else value)
  except (ValueError, TypeError, OverflowError) as e:
    raise ApiError(400, f"{value_field}: {e}", value_field) from e
  try:
    sampling = policies.Sampling(temperature, top_k, top_p)
  except ValueError as e:
    param = next((p for p in ("top_p", "top_k") if p in str(e)), "temperature")
    raise ApiError(400, str(e), param) from e
  try:
    options = layout.DecodeOptions(
        block_size=block_size, mask_id=mask_id, eos_id=eos_id, policy=policy_obj,
        sampling=sampling, sub_block_size=int(sub), max_steps_per_block=int(steps),
        edit_threshold=float(edit), token_shift=token_shift,
        kv_hierarchy=defaults.kv_hierarchy)
  except ValueError as e:
    # The message starts with the field it is about (DecodeOptions' checks).
    field = next((f for f in ("max_steps_per_block", "sub_block_size")
                  if str(e).startswith(f)), "edit_threshold")
    raise ApiError(400, str(e), field) from e
  hy = defaults.kv_hierarchy
  widest = 1 if policy == "ar" else (stride if policy == "isd" else block_size)
  if hy is not None and widest > hy.chunk:
    field = "isd_stride" if policy == "isd" else "policy"
    raise ApiError(400, f"this server's hierarchical KV cache commits chunks of {hy.chunk} "
                   f"positions; policy {policy!r} commits {widest} at once", field)
  return Parsed(prompt, max_tokens, options, policy == "ar",
                None if seed is None else int(seed), tuple(stop), stream, stride, name,
                include_usage, tuple(messages) if chat else ())


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
  """Cuts ``text`` before the first stop string; returns (text, whether one was found)."""
  cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
  return (text[:min(cuts)], True) if cuts else (text, False)


def stop_token_count(decode, ids, stop: tuple[str, ...]) -> int:
  """The completion tokens of a reply cut at a stop string: the generated ids up to and
  including the one whose text completes the first stop string.

  Counted on the ids, not by encoding the cut text again: that gives other tokens (an
  incomplete UTF-8 sequence decodes to U+FFFD, three bytes; special tokens decode to
  nothing) and could exceed ``max_tokens``. ``decode`` maps ids to text; the text of
  all of ``ids`` must hold a stop string (else this is ``len(ids)``).
  """
  lo, hi = 1, len(ids)
  while lo < hi:  # The shortest prefix whose text holds a stop string.
    mid = (lo + hi) // 2
    if apply_stop(decode(ids[:mid]), stop)[1]:
      hi = mid
    else:
      lo = mid + 1
  return hi


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, generated: int, nfe: int) -> dict:
  """OpenAI usage plus the decoder's NFE and TPF (generated tokens, EOS included, / NFE)."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens, "nfe": nfe,
          "tpf": generated / max(nfe, 1)}


def model_card(model: str, created: int) -> dict:
  """The ``/v1/models`` entry of the served model."""
  return {"id": model, "object": "model", "created": created, "owned_by": "blockdiff_jax"}


def completion_body(rid: str, model: str, chat: bool, text: str, finish: str,
                    use: dict) -> dict:
  if chat:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": finish, "logprobs": None}
  else:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
  return {"id": rid, "object": "chat.completion" if chat else "text_completion",
          "created": int(time.time()), "model": model, "choices": [choice], "usage": use}


def chunk_body(rid: str, model: str, chat: bool, text: str | None, finish: str | None,
               use: dict | None = None, role: bool = False, created: int | None = None,
               null_usage: bool = False) -> dict:
  """One SSE chunk (``text`` None = no content, e.g. the role or the final chunk).

  ``created``: the stream's time (OpenAI gives every chunk the same), None = now;
  ``null_usage``: an explicit ``"usage": null`` (when a usage chunk follows).
  """
  if chat:
    delta = {"role": "assistant"} if role else {}
    if text is not None:
      delta["content"] = text
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
  else:
    choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
  out = _chunk(rid, model, chat, created, [choice])
  if use is not None or null_usage:
    out["usage"] = use
  return out


def usage_chunk(rid: str, model: str, chat: bool, created: int, use: dict) -> dict:
  """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
  return dict(_chunk(rid, model, chat, created, []), usage=use)


def _chunk(rid: str, model: str, chat: bool, created: int | None, choices: list) -> dict:
  return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
          "created": int(time.time()) if created is None else created, "model": model,
          "choices": choices}
