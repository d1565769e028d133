"""The serving engine: a bounded queue and a fixed batch of decoding slots.

Design (round batching, not per-forward continuous batching). A worker thread takes up to
``slots`` waiting requests that share the same static decoding options (and, when
sampling, the same seed), lays each out as one row of a canvas of FIXED width and batch
size (unused rows are one-token padding rows) and runs one jitted decode call
(``decoder.decode`` or ``ar.decode_ar``) for the round; when it returns, every request of
the round is resolved and the next round starts. A request that arrives while a round
runs waits for the next round (it does not join at the next forward).

No recompilation per request: the canvas width (the context ``max_len`` rounded up to a
block), the batch size and the prefill width are fixed, and the block decoder always runs
with its block callback (streaming or not), so the compiled decoder depends only on the
decoding options (one compile per distinct options, made at start-up by ``warmup`` for
the server's defaults; a request with other options compiles once on first use). The AR decoder's prefill width is the longest prompt of the
batch, so AR batches carry one extra padding row whose prompt has the longest allowed
length, which pins it.

Batch independence: every row has its own metadata and never attends to another row, so
a greedy row's tokens do not depend on its batch mates (tests/test_serving_engine.py
checks it against the request decoded alone). Sampled rows draw from the batch key
(``seed``), so their draws depend on the row index; requests with different seeds never
share a round.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import layout


class QueueFull(Exception):
  """The queue holds ``queue_size`` requests; retry after ``retry_after_s``."""

  def __init__(self, retry_after_s: float):
    super().__init__(f"queue full; retry after {retry_after_s:.0f} s")
    self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
  """The engine no longer accepts requests."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request (validated by the caller; see ``Engine.check``).

  Attributes:
    prompt_ids: int32 prompt token ids (no MASK).
    max_tokens: tokens to generate at most.
    options: static decoding options (policy, sampling, sub-blocks, editing).
    ar: decode autoregressively instead of by blocks.
    seed: sampling seed (only matters when ``options.sampling.temperature > 0``).
    deadline: ``time.monotonic()`` after which the request is dropped unstarted; None = none.
  """

  prompt_ids: np.ndarray
  max_tokens: int
  options: layout.DecodeOptions
  ar: bool = False
  seed: int = 0
  deadline: float | None = None

  @property
  def group(self) -> tuple:
    """Requests with equal groups can share a decode call (same compiled function)."""
    sampled = self.options.sampling.temperature > 0
    return (self.options, self.ar, self.seed if sampled else None)


@dataclasses.dataclass(frozen=True)
class Result:
  """A finished request.

  Attributes:
    token_ids: generated ids, up to and excluding EOS.
    finish_reason: "stop" (EOS) or "length" (max_tokens reached).
    generated_tokens: generated tokens counting the EOS (the TPF numerator).
    nfe: forwards of the decoder while the row was active.
    round_s: wall time of the decode call that served it.
  """

  token_ids: np.ndarray
  finish_reason: str
  generated_tokens: int
  nfe: int
  round_s: float

  @property
  def tpf(self) -> float:
    return self.generated_tokens / max(self.nfe, 1)


@dataclasses.dataclass
class _Pending:
  request: Request
  future: concurrent.futures.Future
  on_tokens: Callable[[np.ndarray], None] | None
  sent: int = 0  # Generated tokens already streamed.
  ended: bool = False  # EOS streamed.


class Engine:
  """Fixed-slot batch decoding behind a bounded queue, run by one worker thread.

  Usage: ``engine.start()``; ``future = engine.submit(request, on_tokens)``;
  ``future.result()`` is a ``Result``; ``engine.shutdown()`` drains and stops.
  """

  def __init__(self, model: Any, params: Any, tokenizer: tokenizers.Tokenizer,
               block_size: int, max_len: int, slots: int = 4, queue_size: int = 64,
               context: Callable[[], Any] | None = None):
    if slots < 1:
      raise ValueError(f"serve.slots must be >= 1, got {slots}")
    if queue_size < 1:
      raise ValueError(f"serve.queue_size must be >= 1, got {queue_size}")
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2, got {max_len}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.block_size, self.max_len = block_size, max_len
    self.slots, self.queue_size = slots, queue_size
    self.width = -(-max_len // block_size) * block_size
    # Largest start block of any row: a prompt of max_len - 1 tokens.
    self.prefill_width = ((max_len - 1) // block_size) * block_size
    self._queue: collections.deque[_Pending] = collections.deque()
    self._cv = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self._last_round_s = 1.0
    self.rounds = 0
    # Entered by the worker thread around decoding (e.g. the mesh context, thread-local).
    self._context = context or contextlib.nullcontext

  # --- the caller's side --------------------------------------------------------------------

  def check(self, prompt_ids: np.ndarray, max_tokens: int) -> None:
    """Raises ValueError naming the field when a request cannot fit (before queueing)."""
    if len(prompt_ids) == 0:
      raise ValueError("prompt: empty; give at least one token")
    if len(prompt_ids) >= self.max_len:
      raise ValueError(f"prompt: {len(prompt_ids)} tokens; the context is {self.max_len} "
                       "tokens and at least one must be generated")
    if max_tokens < 1:
      raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
    if len(prompt_ids) + max_tokens > self.max_len:
      raise ValueError(f"max_tokens: {len(prompt_ids)} prompt tokens + {max_tokens} exceed "
                       f"the context of {self.max_len} tokens")
    if np.any(np.asarray(prompt_ids) == self.tokenizer.mask_id):
      raise ValueError("prompt: contains the MASK token")

  def submit(self, request: Request,
             on_tokens: Callable[[np.ndarray], None] | None = None
             ) -> concurrent.futures.Future:
    """Queues a request; ``on_tokens(ids)`` (worker thread) gets each final block's new ids.

    Raises:
      QueueFull: ``queue_size`` requests wait already.
      ShuttingDown: after ``shutdown``.
      ValueError: the request does not fit (see ``check``).
    """
    self.check(request.prompt_ids, request.max_tokens)
    future = concurrent.futures.Future()
    with self._cv:
      if self._stopping:
        raise ShuttingDown("the server is shutting down")
      if len(self._queue) >= self.queue_size:
        rounds_ahead = len(self._queue) / self.slots
        raise QueueFull(max(1.0, rounds_ahead * self._last_round_s))
      self._queue.append(_Pending(request, future, on_tokens))
      self._cv.notify()
    return future

  @property
  def queued(self) -> int:
    return len(self._queue)

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="serving-engine", daemon=True)
    self._thread.start()
    return self

  def shutdown(self, drain: bool = True) -> None:
    """Stops accepting; with ``drain`` finishes every queued request first, else cancels."""
    with self._cv:
      self._stopping = True
      if not drain:
        while self._queue:
          self._queue.popleft().future.cancel()
      self._cv.notify_all()
    if self._thread is None and drain and self._queue:
      self.start()  # Never started: the worker drains the queue, then exits.
    if self._thread is not None:
      self._thread.join()

  def warmup(self, options_list: list[tuple[layout.DecodeOptions, bool]]) -> float:
    """Compiles the decoders for these (options, ar) pairs; returns the seconds it took."""
    t0 = time.perf_counter()
    for options, ar in options_list:
      req = Request(np.array([self.tokenizer.bos_id], np.int32), 1, options, ar)
      self._decode([_Pending(req, concurrent.futures.Future(), None)])
    return time.perf_counter() - t0

  # --- the worker ---------------------------------------------------------------------------

  def _take_round(self) -> list[_Pending] | None:
    with self._cv:
      while not self._queue and not self._stopping:
        self._cv.wait()
      if not self._queue:
        return None
      group, batch, rest = None, [], collections.deque()
      now = time.monotonic()
      while self._queue:
        p = self._queue.popleft()
        if p.future.cancelled():
          continue  # The client went away or timed out while it waited.
        if p.request.deadline is not None and now > p.request.deadline:
          p.future.set_exception(TimeoutError("request timed out in the queue"))
          continue
        if len(batch) < self.slots and (group is None or p.request.group == group):
          group = p.request.group
          batch.append(p)
        else:
          rest.append(p)
      self._queue.extend(rest)
    return [p for p in batch if p.future.set_running_or_notify_cancel()]

  def _loop(self) -> None:
    with self._context():
      self._serve()

  def _serve(self) -> None:
    while True:
      batch = self._take_round()
      if batch is None:
        return
      if not batch:
        continue
      try:
        results = self._decode(batch)
      except Exception:  # pylint: disable=broad-except
        # Isolate the failure: each request alone, so only the culprit fails.
        if len(batch) == 1:
          results = [None]
          self._fail(batch[0])
        else:
          results = []
          for p in batch:
            try:
              results += self._decode([p])
            except Exception:  # pylint: disable=broad-except
              results.append(None)
              self._fail(p)
      for p, r in zip(batch, results):
        if r is not None and not p.future.done():
          p.future.set_result(r)

  @staticmethod
  def _fail(p: _Pending) -> None:
    import sys, traceback  # pylint: disable=g-import-not-at-top,multiple-imports
    exc = sys.exc_info()[1]
    traceback.print_exc()
    if not p.future.done():
      p.future.set_exception(exc)

  def _row(self, prompt: np.ndarray, max_tokens: int) -> layout.Canvas:
    return layout.generation_canvas([np.asarray(prompt, np.int32)], max_tokens,
                                    self.block_size, self.tokenizer.mask_id, self.max_len,
                                    self.width)

  def _decode(self, batch: list[_Pending]) -> list[Result]:
    """One decode call for the batch (padded to the fixed shape)."""
    req0 = batch[0].request
    pad = self._row(np.array([self.tokenizer.bos_id], np.int32), 1)
    rows = [self._row(p.request.prompt_ids, p.request.max_tokens) for p in batch]
    rows += [pad] * (self.slots - len(batch))
    if req0.ar:  # Pins the AR prefill width (the longest prompt of the batch).
      rows.append(self._row(np.full((self.max_len - 1,), self.tokenizer.bos_id, np.int32), 1))
    canvas = layout.Canvas(*(np.concatenate([getattr(r, f) for r in rows])
                             for f in ("tokens", "maskable", "length", "start_block")))
    rng = jax.random.key(req0.seed)
    t0 = time.perf_counter()
    if req0.ar:
      out = ar_lib.decode_ar(self.model, self.params, canvas, req0.options, rng)
    else:
      # Always with the block callback, streaming or not: one compiled decoder per options.
      out = decoder.decode(self.model, self.params, canvas, req0.options, rng,
                           on_block=self._block_streamer(batch, canvas),
                           prefill_width=self.prefill_width)
    round_s = time.perf_counter() - t0
    self._last_round_s = round_s
    self.rounds += 1
    results = []
    eos = self.tokenizer.eos_id
    for i, p in enumerate(batch):
      gen = out["tokens"][i, np.flatnonzero(canvas.maskable[i])]
      hits = np.flatnonzero(gen == eos)
      cut = int(hits[0]) if hits.size else len(gen)
      if p.on_tokens is not None and not p.ended and cut > p.sent:
        self._send(p, gen[p.sent:cut])  # AR, or a tail the block stream did not carry.
      results.append(Result(token_ids=gen[:cut].astype(np.int32),
                            finish_reason="stop" if hits.size else "length",
                            generated_tokens=min(cut + 1, len(gen)),
                            nfe=int(out["nfe"][i]), round_s=round_s))
    return results

  @staticmethod
  def _send(p: _Pending, ids: np.ndarray) -> None:
    p.sent += len(ids)
    try:
      p.on_tokens(np.asarray(ids, np.int32))
    except Exception:  # pylint: disable=broad-except
      pass  # A consumer that went away must not stop the round.

  def _block_streamer(self, batch: list[_Pending], canvas: layout.Canvas):
    """``on_block`` that hands each row's newly final generated tokens to its request."""
    bk, eos = self.block_size, self.tokenizer.eos_id
    starts = [int(np.argmax(canvas.maskable[i])) for i in range(len(batch))]

    def on_block(block_index, tokens, active):
      block_index, tokens, active = (np.asarray(block_index), np.asarray(tokens),
                                     np.asarray(active))
      for i, p in enumerate(batch):
        if not active[i] or p.ended or p.on_tokens is None:
          continue
        lo = int(block_index[i]) * bk
        end = starts[i] + p.request.max_tokens
        a, b = max(lo, starts[i] + p.sent), min(lo + bk, end)
        if b <= a:
          continue
        ids = tokens[i, a - lo:b - lo]
        hits = np.flatnonzero(ids == eos)
        if hits.size:
          ids = ids[:hits[0]]
          p.ended = True
        if len(ids):
          self._send(p, ids)
    return on_block
