r"""The OpenAI-compatible HTTP server (``--mode=serve``).

  python -m blockdiff_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=serve --port=8000

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``
(and ``GET /v1/models/{model}``), ``GET /health``. Request bodies are JSON, sent as
``Content-Type: application/json`` or with none (any other type is HTTP 415). Request
fields and decoder options: see ``protocol``.

Library: aiohttp. It is one mature, actively maintained package (server and client,
asyncio-native) with streaming responses (SSE) and graceful shutdown built in, and no
ASGI server to pair with it (starlette would need uvicorn as a second moving part).

Streaming (``stream: true``): the engine (continuous batching, see ``engine``) hands over
each row's tokens as soon as they are final: a committed block for block diffusion, each
token for AR, each forward's accepted run for ISD. Every stream ends with a chunk that
carries ``finish_reason`` and ``usage`` (with ``stream_options.include_usage``, as
OpenAI: ``usage: null`` there and a last chunk with no choices carries it), then
``data: [DONE]``; every chunk has the same ``id`` and ``created``.

Stop strings end decoding: the engine retires a row as soon as its final text holds
one, and the server cuts the text there.

Robustness: validation errors are HTTP 400 (an unknown model 404) with an OpenAI error
body naming the field; a full queue is 429 with ``Retry-After``; each request has a time
limit (504 after it, and its slot is freed); a client that disconnects, queued or
decoding, is dropped and frees its slot at the next forward; a failing prefill fails
only its request, a failing forward reruns its requests one at a time so only the
culprit gets the 500; a dead engine worker is 503 (``/health`` too); on shutdown the
engine drains what is queued and running.
"""

import asyncio
import json
import math
import re
import secrets
import sys
import time

from aiohttp import web
import numpy as np

from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import layout
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import protocol


class Server:
  """The aiohttp application over an ``engine_lib.Engine``."""

  def __init__(self, engine: engine_lib.Engine, model_name: str,
               defaults: protocol.Defaults = protocol.Defaults(),
               token_shift: bool = False, request_timeout_s: float = 600.0,
               compile_s: float | None = None):
    self.engine, self.tokenizer = engine, engine.tokenizer
    self.model_name, self.defaults = model_name, defaults
    self.token_shift, self.timeout = token_shift, request_timeout_s
    self.compile_s = compile_s
    self.created = int(time.time())
    self.stopping = False

  def app(self) -> web.Application:
    app = web.Application(middlewares=[self._errors])
    app.router.add_post("/v1/completions", self.completions)
    app.router.add_post("/v1/chat/completions", self.chat)
    app.router.add_get("/v1/models", self.models)
    # Model ids may hold slashes ("org/name"), as the client puts them in the path.
    app.router.add_get("/v1/models/{model:.+}", self.model)
    app.router.add_get("/health", self.health)
    app.on_shutdown.append(self._on_shutdown)
    return app

  async def _on_shutdown(self, app):
    del app
    self.stopping = True
    await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

  @web.middleware
  async def _errors(self, request, handler):
    try:
      return await handler(request)
    except protocol.ApiError as e:
      return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
      # aiohttp's own text when it says more than the status line: a 413's names the
      # body size limit, which "Request Entity Too Large" alone leaves the client to guess.
      text = e.text if e.text and e.text != f"{e.status}: {e.reason}" else e.reason
      err = protocol.ApiError(e.status, text, None)
      # Keep e.g. a 405's Allow; the body is ours, so not its type or length.
      headers = {k: v for k, v in e.headers.items()
                 if k.lower() not in ("content-type", "content-length")}
      return web.json_response(err.body(), status=e.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      err = protocol.ApiError(500, f"internal error: {e!r}", None, "server_error")
      return web.json_response(err.body(), status=500)

  # --- simple endpoints ---------------------------------------------------------------------

  async def models(self, request):
    del request
    return web.json_response({"object": "list", "data": [
        protocol.model_card(self.model_name, self.created)]})

  async def model(self, request):
    """``GET /v1/models/{model}`` (the client's ``models.retrieve``)."""
    name = request.match_info["model"]
    if name != self.model_name:
      raise protocol.ApiError(404, f"the model {name!r} does not exist; this server serves "
                              f"{self.model_name!r}", "model", code="model_not_found")
    return web.json_response(protocol.model_card(self.model_name, self.created))

  async def health(self, request):
    del request
    status = ("stopping" if self.stopping else "ok" if self.engine.healthy
              else "engine_failed")
    body = {"status": status, "queued": self.engine.queued,
            "slots": self.engine.slots, "running": self.engine.running,
            "admitted": self.engine.admitted, "forwards": self.engine.forwards,
            "compile_s": self.compile_s}
    return web.json_response(body, status=200 if status == "ok" else 503)

  # --- generation ---------------------------------------------------------------------------

  async def completions(self, request):
    return await self._generate(request, chat=False)

  async def chat(self, request):
    return await self._generate(request, chat=True)

  def render_chat(self, messages) -> str:
    """The tokenizer's chat template when it has one, else SFT's ``BOS prompt SEP``
    (``encode_messages``), spelled with the specials' names."""
    if hasattr(self.tokenizer, "apply_chat_template"):
      try:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
      except Exception as e:  # pylint: disable=broad-except
        # The template rejected the conversation (e.g. roles out of order).
        raise protocol.ApiError(400, f"messages: {e}", "messages") from e
    return f"{tokenizers.BOS}{_plain_chat(messages)}{tokenizers.SEP}"

  def encode(self, text: str, param: str = "prompt") -> np.ndarray:
    """The prompt's ids; errors name ``param`` (chat: ``messages``)."""
    if hasattr(self.tokenizer, "encode_with_specials"):
      return np.asarray(self.tokenizer.encode_with_specials(text), np.int32)
    try:
      parsed = layout.parse(self.tokenizer, text)
    except ValueError as e:
      raise protocol.ApiError(400, f"{param}: {e}", param) from e
    if parsed.maskable.any():
      raise protocol.ApiError(400, f"{param}: <|mask:N|> spans are not supported here",
                              param)
    return parsed.ids

  def encode_messages(self, messages, text: str) -> np.ndarray:
    """A chat's ids (``text``: its rendering). Special-token names typed in a message
    stay text, or a user could close their turn and write a system one.

    Without a chat template: the prompt SFT trains such a model on (``sft.render``),
    ``BOS``, the contents encoded as text (never parsed for names), ``SEP``; a model
    fine-tuned by our SFT must be served in the layout it learned.
    """
    if not hasattr(self.tokenizer, "encode_chat"):
      if hasattr(self.tokenizer, "apply_chat_template"):
        return self.encode(text, "messages")  # A template without a safe encoder.
      # sft.render takes a record whose last message is the response: an empty one.
      head, _ = sft.render(self.tokenizer, [*messages, {"role": "assistant", "content": ""}])
      return np.asarray(head, np.int32)
    try:
      return np.asarray(self.tokenizer.encode_chat(messages), np.int32)
    except ValueError as e:
      param = _message_field(str(e), len(messages))
      raise protocol.ApiError(400, f"{param}: {e}", param) from e

  def check(self, ids: np.ndarray, max_tokens: int, chat: bool,
            max_tokens_field: str = "max_tokens") -> None:
    """``Engine.check`` as an ApiError naming the request's own field; only the length
    errors carry the code ``context_length_exceeded``."""
    try:
      self.engine.check(ids, max_tokens)
    except ValueError as e:
      field, _, rest = str(e).partition(":")
      param = {"prompt": "messages" if chat else "prompt",
               "max_tokens": max_tokens_field}.get(field, field)
      code = ("context_length_exceeded" if isinstance(e, engine_lib.ContextLengthError)
              else None)
      raise protocol.ApiError(400, f"{param}:{rest}", param, code=code) from e

  async def _generate(self, request, chat: bool):
    if self.stopping:
      raise protocol.ApiError(503, "the server is shutting down", None, "server_error")
    require_json(request)
    try:
      body = await request.json()
    except (ValueError, LookupError, RecursionError) as e:
      # Bad JSON or UTF-8 (ValueError), an unknown charset, nesting too deep to parse.
      raise protocol.ApiError(400, f"the body is not valid JSON: {e}", None) from e
    parsed = protocol.parse_request(
        body, self.model_name, chat, self.tokenizer, self.engine.block_size,
        self.tokenizer.mask_id, self.tokenizer.eos_id, self.defaults, self.token_shift,
        render_chat=self.render_chat)
    ids = (self.encode_messages(list(parsed.messages), parsed.prompt_text) if chat
           else self.encode(parsed.prompt_text))
    max_tokens = parsed.max_tokens
    if max_tokens is None:
      max_tokens = max(1, min(self.defaults.max_tokens, self.engine.max_len - len(ids)))
    self.check(ids, max_tokens, chat, parsed.max_tokens_field)
    # No seed: a fresh one per request, so sampled answers differ (as OpenAI's do).
    seed = secrets.randbits(63) if parsed.seed is None else parsed.seed
    req = engine_lib.Request(ids, max_tokens, parsed.options, parsed.ar, seed,
                             deadline=time.monotonic() + self.timeout,
                             isd_stride=parsed.isd_stride, stop=parsed.stop)
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    if parsed.stream:
      return await self._stream(request, req, parsed, rid, chat)
    future = self._submit(req)
    try:
      result = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
    except (asyncio.TimeoutError, TimeoutError) as e:  # Distinct before Python 3.11.
      future.cancel()
      raise protocol.ApiError(504, f"the request took longer than {self.timeout} s", None,
                              "timeout_error") from e
    except asyncio.CancelledError:
      future.cancel()  # The client disconnected: drop it if it has not started.
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise protocol.ApiError(500, f"decoding failed: {e!r}", None, "server_error") from e
    text, finish, completion = self._finish_text(result, parsed.stop)
    use = protocol.usage(len(ids), completion, result.generated_tokens, result.nfe)
    return web.json_response(protocol.completion_body(rid, self.model_name, chat, text,
                                                      finish, use))

  def _submit(self, req, on_tokens=None):
    try:
      return self.engine.submit(req, on_tokens)
    except engine_lib.QueueFull as e:
      secs = str(math.ceil(e.retry_after_s))
      raise protocol.ApiError(429, f"the queue is full; retry after {secs} s", None,
                              "rate_limit_error", headers={"Retry-After": secs}) from e
    except engine_lib.ShuttingDown as e:
      raise protocol.ApiError(503, str(e), None, "server_error") from e

  def _finish_text(self, result, stop):
    """(text cut at a stop string, finish_reason, completion tokens)."""
    text = self.tokenizer.decode(result.token_ids)
    text, stopped = protocol.apply_stop(text, stop)
    if stopped:
      return text, "stop", protocol.stop_token_count(self.tokenizer.decode,
                                                     result.token_ids, stop)
    return text, result.finish_reason, len(result.token_ids)

  async def _stream(self, request, req, parsed, rid, chat):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    future = self._submit(
        req, on_tokens=lambda ids: loop.call_soon_threadsafe(queue.put_nowait, ids))
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, None))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    created = int(time.time())

    async def send(obj):
      await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    def chunk(text, finish=None, use=None, role=False):
      return protocol.chunk_body(rid, self.model_name, chat, text, finish, use, role,
                                 created, null_usage=parsed.include_usage)

    holdback = max((len(s) for s in parsed.stop), default=1) - 1
    ids, sent, stopped = [], 0, False
    deadline = time.monotonic() + self.timeout
    try:
      await resp.prepare(request)  # In the try: if it fails, the request must go too.
      if chat:
        await send(chunk(None, role=True))
      while True:
        item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
        if item is None:
          break
        if stopped:
          continue
        ids.extend(int(t) for t in item)
        text = self.tokenizer.decode(np.asarray(ids, np.int32))
        text, stopped = protocol.apply_stop(text, parsed.stop)
        end = len(text)
        while end > sent and text[end - 1] == "\ufffd":
          end -= 1  # An incomplete UTF-8 sequence: wait for its next bytes.
        if not stopped:
          # Held back after the trim: a U+FFFD is no character of the text yet, and
          # counted in the holdback it let out the start of a stop string it completes.
          end -= holdback
        if end > sent:
          await send(chunk(text[sent:end]))
          sent = end
      result = future.result()
      text, finish, completion = self._finish_text(result, parsed.stop)
      if len(text) > sent:
        await send(chunk(text[sent:]))
      use = protocol.usage(len(req.prompt_ids), completion, result.generated_tokens,
                           result.nfe)
      if parsed.include_usage:
        await send(chunk(None, finish))
        await send(protocol.usage_chunk(rid, self.model_name, chat, created, use))
      else:
        await send(chunk(None, finish, use))
    except (asyncio.TimeoutError, TimeoutError):  # Distinct before Python 3.11.
      future.cancel()
      await send(protocol.ApiError(504, f"the request took longer than {self.timeout} s",
                                   None, "timeout_error").body())
    except (asyncio.CancelledError, ConnectionResetError):
      future.cancel()  # The client went away.
      raise
    except Exception as e:  # pylint: disable=broad-except
      future.cancel()  # No-op when decoding is what failed.
      if not resp.prepared:  # Nothing was sent: the middleware answers the error.
        raise
      await send(protocol.ApiError(500, f"decoding failed: {e!r}", None,
                                   "server_error").body())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _message_field(error: str, count: int) -> str:
  """The field an ``encode_chat`` error names: ``messages[i].<field>`` from its
  "message i: the <field> ..." text (``content`` when it names none), else ``messages``."""
  match = re.match(r"message (\d+)\b(?:: the (\w+)\b)?", error)
  if match is None or int(match.group(1)) >= count:
    return "messages"
  # A field other than role or content (a list of parts is content too): reasoning_content.
  return f"messages[{match.group(1)}].{match.group(2) or 'content'}"


def _plain_chat(messages) -> str:
  """The template-less prompt between ``BOS`` and ``SEP``: the contents, one a line
  (``sft.render``; SFT without a template trains no role names)."""
  return "\n".join(m["content"] for m in messages)


def require_json(request) -> None:
  """Raises a 415 ApiError when the body is declared as something other than JSON.

  OpenAI's API takes ``application/json`` bodies. A body declared text/plain or a form
  (``curl -d`` without ``-H``) is refused rather than parsed as JSON anyway; a body with
  no (or an empty) Content-Type is taken as JSON, as FastAPI-based servers do, so clients
  that post ``json.dumps(...)`` without the header keep working.
  """
  got = request.headers.get("Content-Type")
  # content_type: lower-cased, parameters (charset) stripped.
  if got and request.content_type != "application/json":
    raise protocol.ApiError(
        415, f"Content-Type must be application/json, got {got!r}", None,
        code="unsupported_media_type", headers={"Accept-Post": "application/json"})


def run(config, workdir: str, host: str | None = None, port: int | None = None) -> None:
  """``--mode=serve``: loads the model, compiles the decoders, serves until interrupted."""
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import sample  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.serving import config as serve_config  # pylint: disable=g-import-not-at-top
  s = config.get("serve", None) or serve_config.default_serve_config()
  serve_config.validate(s)
  host = host or s.host
  port = s.port if port is None else port
  config, model, tokenizer, params = inference.load_for_inference(workdir, config)
  smp = config.sample
  token_shift = bool(config.diffusion.get("token_shift", False))
  # A token-shifted model decodes AR by default, or by ISD when its config says so.
  defaults = protocol.Defaults(policy=smp.policy if not token_shift or smp.policy == "isd"
                               else "ar",
                               policy_value=smp.policy_value,
                               sub_block_size=smp.sub_block_size,
                               edit_threshold=smp.edit_threshold,
                               max_steps_per_block=smp.max_steps_per_block,
                               max_tokens=s.max_tokens, isd_stride=smp.isd_stride,
                               kv_hierarchy=sample.options_from_config(
                                   smp, config.diffusion.block_size, tokenizer,
                                   token_shift).kv_hierarchy)
  eng = engine_lib.Engine(model, params, tokenizer, config.diffusion.block_size,
                          s.max_len or config.data.seq_len, s.slots, s.queue_size,
                          context=lambda: inference.inference_context(config),
                          forwards_per_call=s.get("forwards_per_call", 1))
  compile_s = None
  with inference.inference_context(config):
    if s.warmup:
      body = {"model": s.model_name, "prompt": "<|bos|>", "policy": defaults.policy}
      parsed = protocol.parse_request(body, s.model_name, False, tokenizer,
                                      eng.block_size, tokenizer.mask_id, tokenizer.eos_id,
                                      defaults, token_shift)
      compile_s = eng.warmup([(parsed.options, parsed.ar, parsed.isd_stride)])
      print(f"compiled the {defaults.policy} decoder in {compile_s:.1f} s "
            f"({eng.slots} slots, context {eng.max_len})", flush=True)
    eng.start()
    server = Server(eng, s.model_name, defaults, token_shift, s.request_timeout_s, compile_s)
    print(f"serving {s.model_name!r} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its
    # queued request.
    web.run_app(server.app(), host=host, port=port, print=None, handler_cancellation=True,
                shutdown_timeout=s.request_timeout_s)
