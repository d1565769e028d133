"""The serving engine: a bounded queue feeding pools of decoding slots (continuous batching).

Design. A worker thread owns one ``pool.SlotPool`` per decoding setup in use (decoder
kind, options and ISD stride: requests with equal setups share a compiled program; at
most ``max_pools`` setups are live, idle ones are dropped first). Each iteration it

1. admits waiting requests, in arrival order, into free slots of their setup's pool (one
   bucketed prefill each), so a new request starts at the next forward; one that must
   wait (no free slot, its pool compiling, a retry running alone) holds back the later
   requests of its setup, which never overtake it; one whose setup has no pool and no
   room for one (``max_pools`` pools, all busy) also closes the busy pool with the fewest
   rows to later requests, so that pool drains and makes room (later requests kept it
   busy before), while the other pools go on admitting;
2. runs one forward of every busy pool;
3. streams each row's newly final tokens (a committed block; an AR or ISD token as soon
   as it is emitted), and resolves and frees every row that is done, so its slot takes
   the next request at once.

Rows never wait for each other: each slot advances by its own decoder state, and a slot
computes what the request decoded alone computes (see ``pool``), so a batched answer
equals the request's answer alone, greedy or sampled with its seed.

A request whose client went away (its future cancelled), whose time limit passed or
whose final text holds one of its stop strings is retired at the next iteration: its
slot is free for the next forward. A failing prefill fails only its request; a failing
forward (a device error) requeues the pool's requests to run again one at a time, so a
request that breaks it fails alone; any other error fails the requests of the pool it
hit, and the worker goes on. Should the worker die all the same, every request waiting
on it fails and ``submit`` refuses new ones (``WorkerDied``): none waits forever.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import layout
from blockdiff_jax.serving import pool as pool_lib


class QueueFull(Exception):
  """The queue holds ``queue_size`` requests; retry after ``retry_after_s``."""

  def __init__(self, retry_after_s: float):
    super().__init__(f"queue full; retry after {retry_after_s:.0f} s")
    self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
  """The engine no longer accepts requests."""


class WorkerDied(ShuttingDown):
  """The worker thread stopped on an error: nothing queued would ever be decoded."""


class ContextLengthError(ValueError):
  """The prompt, or the prompt and ``max_tokens``, exceed the context."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request (validated by the caller; see ``Engine.check``).

  Attributes:
    prompt_ids: int32 prompt token ids (no MASK).
    max_tokens: tokens to generate at most.
    options: static decoding options (policy, sampling, sub-blocks, editing).
    ar: decode autoregressively instead of by blocks.
    seed: sampling seed (only matters when ``options.sampling.temperature > 0``).
    deadline: ``time.monotonic()`` after which the request is dropped (queued or
      running); None = none.
    isd_stride: decode by I-DLM's strided decoding with this stride (>= 2); 0 = no.
    stop: stop strings: the request ends as soon as the text of its final tokens holds
      one (the caller cuts the text there).
  """

  prompt_ids: np.ndarray
  max_tokens: int
  options: layout.DecodeOptions
  ar: bool = False
  seed: int = 0
  deadline: float | None = None
  isd_stride: int = 0
  stop: tuple[str, ...] = ()

  @property
  def decoder(self) -> pool_lib.Decoder:
    """The pool this request runs in (equal decoders share compiled programs)."""
    kind = "isd" if self.isd_stride else "ar" if self.ar else "block"
    return pool_lib.Decoder(self.options, kind, self.isd_stride)


@dataclasses.dataclass(frozen=True)
class Result:
  """A finished request.

  Attributes:
    token_ids: generated ids, up to and excluding EOS (after a stop string: the tokens
      final when it showed, which may run past it).
    finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens reached).
    generated_tokens: generated tokens counting the EOS (the TPF numerator).
    nfe: forwards of the decoder while the row was active (its prefill included for AR
      and ISD, which emit a token from it).
    decode_s: wall time from admission (prefill) to the last forward.
  """

  token_ids: np.ndarray
  finish_reason: str
  generated_tokens: int
  nfe: int
  decode_s: float

  @property
  def tpf(self) -> float:
    return self.generated_tokens / max(self.nfe, 1)


@dataclasses.dataclass
class _Pending:
  request: Request
  future: concurrent.futures.Future
  on_tokens: Callable[[np.ndarray], None] | None
  sent: int = 0  # Generated tokens already streamed.
  checked: int = 0  # Final tokens already searched for a stop string.
  ended: bool = False  # EOS streamed.
  solo: bool = False  # Runs alone in its pool (a retry after a failed forward).
  started: float = 0.0  # time.perf_counter() at admission.


class Engine:
  """Continuous batching behind a bounded queue, run by one worker thread.

  Usage: ``engine.start()``; ``future = engine.submit(request, on_tokens)``;
  ``future.result()`` is a ``Result``; ``engine.shutdown()`` drains and stops.
  Cancelling the future (a client that left) frees the request's slot.
  """

  def __init__(self, model: Any, params: Any, tokenizer: tokenizers.Tokenizer,
               block_size: int, max_len: int, slots: int = 4, queue_size: int = 64,
               context: Callable[[], Any] | None = None, max_pools: int = 4,
               forwards_per_call: int = 1):
    if slots < 1:
      raise ValueError(f"serve.slots must be >= 1, got {slots}")
    if queue_size < 1:
      raise ValueError(f"serve.queue_size must be >= 1, got {queue_size}")
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2, got {max_len}")
    if max_pools < 1:
      raise ValueError(f"max_pools must be >= 1, got {max_pools}")
    if forwards_per_call < 1:  # Else every request would fail, when its pool builds.
      raise ValueError(f"serve.forwards_per_call must be >= 1, got {forwards_per_call}")
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.block_size, self.max_len = block_size, max_len
    self.slots, self.queue_size, self.max_pools = slots, queue_size, max_pools
    # 1 = a request joins at the very next forward; k > 1 runs up to k forwards per host
    # round trip (until a row finishes), trading join latency for less dispatch overhead.
    self.forwards_per_call = forwards_per_call
    self.width = -(-max_len // block_size) * block_size
    self._queue: collections.deque[_Pending] = collections.deque()
    # Requests the worker took off the queue and has not admitted yet (it admits them
    # one prefill at a time; those without a slot go back): they still wait, so they
    # count against queue_size, and fail with the queue should the worker die.
    self._held: list[_Pending] = []
    self._admitting: _Pending | None = None  # The one in its prefill (fails if it dies).
    self._cv = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self._pools: dict[pool_lib.Decoder, pool_lib.SlotPool] = {}
    self._rows: dict[pool_lib.Decoder, dict[int, _Pending]] = {}
    # Pools of decoders never seen before, compiling on the compile thread (so the other
    # pools' rows keep decoding meanwhile); they count towards max_pools.
    self._building: dict[pool_lib.Decoder, concurrent.futures.Future] = {}
    self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
    # Rows holding a slot, kept by the worker: other threads read this, never _rows,
    # which the worker changes under them.
    self._running = 0
    self._error: BaseException | None = None  # What killed the worker.
    self._request_s = 1.0  # Running mean of a request's decode time (for Retry-After).
    self.admitted = 0  # Requests that entered a slot.
    self.retired = 0  # Requests dropped while decoding (client gone, out of time).
    self.forwards = 0  # Forwards of all pools.
    # Entered by the worker thread around decoding (e.g. the mesh context, thread-local).
    self._context = context or contextlib.nullcontext

  # --- the caller's side --------------------------------------------------------------------

  def check(self, prompt_ids: np.ndarray, max_tokens: int) -> None:
    """Raises ValueError naming the field when a request cannot fit (before queueing)."""
    if len(prompt_ids) == 0:
      raise ValueError("prompt: empty; give at least one token")
    if len(prompt_ids) >= self.max_len:
      raise ContextLengthError(f"prompt: {len(prompt_ids)} tokens; the context is "
                               f"{self.max_len} tokens and at least one must be generated")
    if max_tokens < 1:
      raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
    if len(prompt_ids) + max_tokens > self.max_len:
      raise ContextLengthError(f"max_tokens: {len(prompt_ids)} prompt tokens + {max_tokens} "
                               f"exceed the context of {self.max_len} tokens")
    if np.any(np.asarray(prompt_ids) == self.tokenizer.mask_id):
      raise ValueError("prompt: contains the MASK token")

  def submit(self, request: Request,
             on_tokens: Callable[[np.ndarray], None] | None = None
             ) -> concurrent.futures.Future:
    """Queues a request; ``on_tokens(ids)`` (worker thread) gets its newly final tokens.

    Raises:
      QueueFull: ``queue_size`` requests wait already.
      ShuttingDown: after ``shutdown``; ``WorkerDied`` once the worker died.
      ValueError: the request does not fit (see ``check``) or names a bad decoder.
    """
    self.check(request.prompt_ids, request.max_tokens)
    request.decoder  # pylint: disable=pointless-statement  (validates kind and stride)
    future = concurrent.futures.Future()
    with self._cv:
      if self._error is not None:
        raise WorkerDied(f"the decoding worker stopped: {self._error!r}")
      if self._stopping:
        raise ShuttingDown("the server is shutting down")
      if self.queued >= self.queue_size:
        waves = self.queued / self.slots
        raise QueueFull(max(1.0, waves * self._request_s))
      self._queue.append(_Pending(request, future, on_tokens))
      self._cv.notify()
    return future

  @property
  def queued(self) -> int:
    """Requests waiting for a slot (those the worker took to admit included)."""
    return len(self._queue) + len(self._held)

  @property
  def running(self) -> int:
    """Requests holding a slot."""
    return self._running

  @property
  def healthy(self) -> bool:
    """False once the worker died: what is queued would never be decoded."""
    thread = self._thread
    return self._error is None and (thread is None or self._stopping or thread.is_alive())

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="serving-engine", daemon=True)
    self._thread.start()
    return self

  def shutdown(self, drain: bool = True) -> None:
    """Stops accepting; with ``drain`` finishes every queued request first, else cancels."""
    with self._cv:
      self._stopping = True
      if not drain:
        for p in list(self._queue) + self._held:
          p.future.cancel()
        self._queue.clear()
      self._cv.notify_all()
    if self._thread is None and drain and self._queue:
      self.start()  # Never started: the worker drains the queue, then exits.
    if self._thread is not None:
      self._thread.join()
    if self._compiler is not None:
      self._compiler.shutdown(wait=True, cancel_futures=True)

  def warmup(self, setups: list[tuple]) -> float:
    """Compiles the pools of these ``(options, ar[, isd_stride])``; returns the seconds."""
    t0 = time.perf_counter()
    with self._context():
      for setup in setups:
        options, ar, stride = (tuple(setup) + (0,))[:3]
        dec = Request(np.zeros((1,), np.int32), 1, options, ar, isd_stride=stride).decoder
        if dec not in self._pools and self._make_room():
          self._pools[dec], self._rows[dec] = self._build(dec), {}
    return time.perf_counter() - t0

  # --- the worker ---------------------------------------------------------------------------

  def _pool(self, dec: pool_lib.Decoder) -> pool_lib.SlotPool | None:
    """The pool of ``dec``; None while it compiles, or when all pools are busy.

    A decoder setup never seen before (a request's own threshold, say) is built and
    compiled on the compile thread: the worker goes on advancing the other pools
    instead of stalling every request for the compile.

    Raises:
      Exception: the pool's build failed (the request that asked fails; the next one
        for this decoder tries again).
    """
    if dec in self._pools:
      return self._pools[dec]
    job = self._building.get(dec)
    if job is None:
      if self._make_room():
        if self._compiler is None:
          self._compiler = concurrent.futures.ThreadPoolExecutor(
              1, thread_name_prefix="serving-compile")
        job = self._building[dec] = self._compiler.submit(self._build, dec)
        job.add_done_callback(lambda _: self._wake())
      return None
    if not job.done():
      return None
    del self._building[dec]
    self._pools[dec], self._rows[dec] = job.result(), {}
    return self._pools[dec]

  def _make_room(self) -> bool:
    """Drops an idle pool if max_pools are made or compiling; False if none is idle."""
    # Builds that ended but that no request collected (its client left or timed out
    # while it compiled) would hold their place for good: a made pool joins the others,
    # idle, so it may be dropped like them.
    for dec, job in list(self._building.items()):
      if job.done() and not job.cancelled() and job.exception() is None:
        del self._building[dec]
        self._pools[dec], self._rows[dec] = job.result(), {}
    if len(self._pools) + len(self._building) < self.max_pools:
      return True
    # Still full: failed builds go too (a request still asking builds again).
    for dec, job in list(self._building.items()):
      if job.done():
        del self._building[dec]
    if len(self._pools) + len(self._building) < self.max_pools:
      return True
    idle = [d for d, p in self._pools.items() if not p.busy]
    if not idle:
      return False
    del self._pools[idle[0]], self._rows[idle[0]]  # No rows: the count stays.
    return True

  def _build(self, dec: pool_lib.Decoder) -> pool_lib.SlotPool:
    with self._context():
      pool = pool_lib.SlotPool(self.model, self.params, dec, self.slots, self.width,
                               self.max_len - 1, self.forwards_per_call)
      pool.warmup()
    return pool

  def _wake(self) -> None:
    with self._cv:
      self._cv.notify_all()

  def _take(self) -> list[_Pending] | None:
    """Waits for work; returns the waiting requests in order ([] = just advance), None = exit."""
    with self._cv:
      while not self._queue and not self.running and not self._stopping:
        self._cv.wait()
      if not self._queue and not self.running:
        return None
      take, now = [], time.monotonic()
      while self._queue:
        p = self._queue.popleft()
        if p.future.cancelled():
          continue  # The client went away while it waited.
        if p.request.deadline is not None and now > p.request.deadline:
          _resolve(p.future, exc=TimeoutError("request timed out in the queue"))
          continue
        take.append(p)
      self._held = list(take)
    return take

  def _loop(self) -> None:
    try:
      with self._context():
        while True:
          take = self._take()
          if take is None:
            return
          self._iterate(take)
          with self._cv:  # Only compiles to wait for: sleep until one ends (no spin).
            if (self._building and not self._running
                and not any(job.done() for job in self._building.values())):
              self._cv.wait(timeout=1.0)
    except BaseException as e:
      # No request may wait on a worker that is gone: fail them all, refuse new ones.
      with self._cv:
        self._error = e
        gone = list(self._queue) + self._held
        gone += [self._admitting] if self._admitting is not None else []
        gone += [p for rows in self._rows.values() for p in rows.values()]
        self._queue.clear()
        self._held, self._admitting = [], None
      for p in gone:
        _resolve(p.future, exc=RuntimeError(f"the decoding worker stopped: {e!r}"))
      traceback.print_exc()

  def _iterate(self, take: list[_Pending]) -> None:
    """One iteration: admit what fits, then one forward of every busy pool.

    An unexpected error fails only the requests it concerns (the request being
    admitted, or the rows of the pool being advanced) and the worker goes on.
    """
    waiting, blocked = [], set()
    for p in take:
      dec = p.request.decoder
      if dec in blocked:  # One waits before it: first come, first served.
        waiting.append(p)
        continue
      with self._cv:  # In its prefill: no longer waiting (back below if no slot).
        self._held = [q for q in self._held if q is not p]
        self._admitting = p
      try:
        admitted = self._admit(p)
      except Exception:  # pylint: disable=broad-except
        self._fail([p])  # E.g. its pool failed to build.
        admitted = True
      with self._cv:
        self._admitting = None
        if not admitted:  # No slot now: it waits on, and so do the later ones of `dec`.
          self._held.append(p)
          waiting.append(p)
          blocked.add(dec)
          if dec not in self._pools and dec not in self._building:
            blocked.add(self._drain_for_room())
    with self._cv:  # Back to the front, in arrival order.
      self._queue.extendleft(reversed(waiting))
      self._held = []
    for dec in [d for d, rows in self._rows.items() if rows]:
      try:
        self._advance(dec)
      except Exception:  # pylint: disable=broad-except
        self._drop(dec)

  def _drain_for_room(self) -> pool_lib.Decoder | None:
    """The pool that takes no new rows while a request waits for room for its own.

    Neither made nor compiling, that request found no idle pool to drop: admitted into
    the busy pools, later requests kept them busy and it waited until its time limit
    while they overtook it. The pool with the fewest rows drains first (the choice is
    stable: a closed pool only loses rows) and is then dropped for it.
    """
    busy = [d for d in self._pools if self._rows.get(d)]
    return min(busy, key=lambda d: len(self._rows[d])) if busy else None

  def _recount(self) -> None:
    self._running = sum(len(rows) for rows in self._rows.values())

  def _admit(self, p: _Pending) -> bool:
    """Prefills ``p`` into a free slot of its pool; False = no slot now (it waits)."""
    if p.future.cancelled():
      return True  # Its client left while the worker admitted the ones before it.
    dec = p.request.decoder
    rows = self._rows.get(dec, {})
    if any(r.solo for r in rows.values()) or (p.solo and rows):
      return False  # A retry runs alone in its pool.
    pool = self._pool(dec)
    if pool is None or not pool.free:
      return False
    try:
      slot = pool.admit(p.request.prompt_ids, p.request.max_tokens, p.request.seed)
    except Exception:  # pylint: disable=broad-except
      self._fail([p])
      return True
    p.started = time.perf_counter()
    self._rows[dec][slot] = p
    self._recount()
    self.admitted += 1
    return True

  def _advance(self, dec: pool_lib.Decoder) -> None:
    pool, rows = self._pools[dec], self._rows[dec]
    now = time.monotonic()
    for slot, p in list(rows.items()):  # Clients that left, requests out of time.
      late = p.request.deadline is not None and now > p.request.deadline
      if p.future.cancelled() or late:
        if late:
          _resolve(p.future, exc=TimeoutError("request timed out while decoding"))
        pool.retire(slot)
        del rows[slot]
        self._recount()
        self.retired += 1
    if not rows:
      return
    try:
      view = pool.advance()
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      self._requeue_alone(dec)
      return
    self.forwards += view.forwards
    eos = self.tokenizer.eos_id
    for slot, p in list(rows.items()):
      start = len(p.request.prompt_ids)
      end = start + p.request.max_tokens
      gen = view.tokens[slot, start:end]
      final = min(int(view.final[slot]), end) - start
      if p.on_tokens is not None and not p.ended and final > p.sent:
        ids = gen[p.sent:final]
        hits = np.flatnonzero(ids == eos)
        if hits.size:
          ids, p.ended = ids[:hits[0]], True
        if len(ids):
          self._send(p, ids)
      done = bool(view.done[slot])
      stopped = not done and self._stop_shows(p, gen, final)
      if done or stopped:
        n = len(gen) if done else final
        hits = np.flatnonzero(gen[:n] == eos)
        cut = int(hits[0]) if hits.size else n
        if p.on_tokens is not None and not p.ended and cut > p.sent:
          self._send(p, gen[p.sent:cut])
        decode_s = time.perf_counter() - p.started
        self._request_s = 0.8 * self._request_s + 0.2 * decode_s
        result = Result(token_ids=gen[:cut].astype(np.int32),
                        finish_reason="stop" if hits.size or stopped else "length",
                        generated_tokens=min(cut + 1, n), nfe=int(view.nfe[slot]),
                        decode_s=decode_s)
        if stopped:
          pool.retire(slot)  # Still decoding on the device: stop it.
        else:
          pool.release(slot)
        del rows[slot]
        self._recount()
        _resolve(p.future, result)

  def _stop_shows(self, p: _Pending, gen: np.ndarray, final: int) -> bool:
    """Whether the text of the row's first ``final`` tokens holds a stop string (searched
    again only when more tokens are final).

    Only a tail is decoded: a new match ends in the new tokens, so it starts at most a
    stop string's length before them, and a character spans at most 4 tokens (byte
    fallback). Decoding all final tokens each forward cost the worker, which drives
    every pool, time quadratic in the length.
    """
    if not p.request.stop or final <= p.checked:
      return False
    start = max(0, p.checked - 4 * max(len(s) for s in p.request.stop) - 8)
    p.checked = final
    ids = gen[:final]
    hits = np.flatnonzero(ids == self.tokenizer.eos_id)
    text = self.tokenizer.decode(ids[start:hits[0]] if hits.size else ids[start:])
    return any(s in text for s in p.request.stop)

  def _requeue_alone(self, dec: pool_lib.Decoder) -> None:
    """A forward failed: drop the pool; its requests run again, each alone in its pool.

    A request that failed alone is the culprit and fails; one that streamed tokens
    already cannot restart unseen, so it fails too.
    """
    rows = self._rows.pop(dec)
    del self._pools[dec]
    self._recount()
    self._fail([p for p in rows.values() if p.solo or p.sent])
    retry = [dataclasses.replace(p, solo=True, checked=0) for p in rows.values()
             if not (p.solo or p.sent)]
    with self._cv:
      self._queue.extendleft(reversed(retry))

  def _drop(self, dec: pool_lib.Decoder) -> None:
    """An unexpected error while advancing ``dec``'s pool: its requests fail, and the
    pool goes (its state is unknown)."""
    rows = self._rows.pop(dec, {})
    self._pools.pop(dec, None)
    self._recount()
    self._fail(list(rows.values()))

  @staticmethod
  def _fail(pending: list[_Pending]) -> None:
    """Fails these requests with the exception being handled."""
    if not pending:
      return
    exc = sys.exc_info()[1]
    traceback.print_exc()
    for p in pending:
      _resolve(p.future, exc=exc or RuntimeError("decoding failed"))

  @staticmethod
  def _send(p: _Pending, ids: np.ndarray) -> None:
    p.sent += len(ids)
    try:
      p.on_tokens(np.asarray(ids, np.int32))
    except Exception:  # pylint: disable=broad-except
      pass  # A consumer that went away must not stop the others.


def _resolve(future: concurrent.futures.Future, result: Any = None,
             exc: BaseException | None = None) -> None:
  """Sets a future's result (or ``exc``) unless it is done already.

  The client's thread may cancel it at any moment, also between a ``done()`` check and
  the set, which then raises InvalidStateError: that must not reach the worker. A
  StopIteration (a ``next()`` that ran dry) becomes a RuntimeError: asyncio cannot
  raise it into the server's awaiting coroutine, which would never be answered.
  """
  if isinstance(exc, StopIteration):
    exc = RuntimeError(f"decoding failed: {exc!r}")
  try:
    if exc is not None:
      future.set_exception(exc)
    else:
      future.set_result(result)
  except concurrent.futures.InvalidStateError:
    pass  # Cancelled (or timed out) already: nobody waits for it.
