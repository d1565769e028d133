"""Serving hardening (serving7): the engine's queue accounting and worker death over a
fake slot pool, and the slot pool's own errors."""

import threading

import numpy as np
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import layout
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from conftest import FakeSlotPool

TOK = tokenizers.ByteTokenizer()
BLOCK, MAX_LEN = 8, 64
PROMPT = np.array([TOK.bos_id, ord("a")], np.int32)
OPTIONS = layout.DecodeOptions(block_size=BLOCK, mask_id=TOK.mask_id, eos_id=TOK.eos_id)
SLOW = 5  # max_tokens of the request whose prefill blocks until the test lets it go.


class _GatedPool(FakeSlotPool):
  """A fake pool: a row is done after one forward (one token per max_tokens); the
  prefill of a request of ``SLOW`` tokens waits for ``gate`` (a long prefill)."""

  gate: threading.Event
  prefilling: threading.Event
  admit_error: BaseException | None = None

  def admit(self, prompt, max_tokens, seed=0):
    if max_tokens == SLOW:
      self.prefilling.set()
      assert self.gate.wait(60)
      if self.admit_error is not None:
        raise self.admit_error
    return super().admit(prompt, max_tokens, seed)

  def advance(self):
    view = pool_lib.HostView(done=np.zeros(self.slots, bool),
                             final=np.zeros(self.slots, np.int32),
                             nfe=np.ones(self.slots, np.int32),
                             tokens=np.full((self.slots, self.width), ord("x"), np.int32))
    for slot, (start, n, _) in self.rows.items():
      view.done[slot], view.final[slot] = self.occupied[slot], start + n
    return view


@pytest.fixture
def gated(monkeypatch):
  """(an engine with 1 slot and room for 2 waiting requests over a gated pool, the gate)."""
  gate = threading.Event()
  monkeypatch.setattr(_GatedPool, "gate", gate, raising=False)
  monkeypatch.setattr(_GatedPool, "prefilling", threading.Event(), raising=False)
  monkeypatch.setattr(pool_lib, "SlotPool", _GatedPool)
  eng = engine_lib.Engine(None, None, TOK, BLOCK, MAX_LEN, slots=1, queue_size=2)
  yield eng, gate
  gate.set()
  eng.shutdown(drain=False)


def _request(max_tokens):
  return engine_lib.Request(PROMPT, max_tokens, OPTIONS, ar=True)


def test_requests_the_worker_holds_while_admitting_count_as_queued(gated):
  """While a long prefill runs, the requests the worker took off the queue behind it still
  wait: they count against queue_size (no more than queue_size ever wait) and in
  ``queued``; every accepted request completes, in arrival order."""
  eng, gate = gated
  done_order = []
  slow = eng.submit(_request(SLOW))
  behind = eng.submit(_request(3))  # Taken with `slow`; waits: the only slot is taken.
  for f in (slow, behind):
    f.add_done_callback(done_order.append)
  eng.start()
  assert _GatedPool.prefilling.wait(20)
  accepted = []
  with pytest.raises(engine_lib.QueueFull):
    for _ in range(4):
      accepted.append(eng.submit(_request(2)))
      accepted[-1].add_done_callback(done_order.append)
  # `behind` and the accepted ones wait (`slow` is in its prefill): at most queue_size.
  assert 1 + len(accepted) <= eng.queue_size
  assert eng.queued == 1 + len(accepted)
  gate.set()
  for f in [slow, behind] + accepted:
    f.result(timeout=20)
  assert done_order == [slow, behind] + accepted  # One slot: in arrival order.
  assert eng.queued == 0


def test_a_worker_dying_mid_admission_fails_the_requests_it_held(gated):
  """The worker dies in a prefill (an error no handler stops): the requests it took off the
  queue with it fail, none waits forever."""
  eng, gate = gated
  _GatedPool.admit_error = KeyboardInterrupt()
  try:
    slow = eng.submit(_request(SLOW))
    behind = eng.submit(_request(3))
    eng.start()
    assert _GatedPool.prefilling.wait(20)
    gate.set()
    for f in (slow, behind):
      with pytest.raises(RuntimeError, match="worker stopped"):
        f.result(timeout=20)
    assert not eng.healthy and eng.queued == 0
  finally:
    _GatedPool.admit_error = None


def test_a_pool_ready_midway_through_admission_keeps_arrival_order(gated, monkeypatch):
  """The pool becomes ready between two admissions (its compile ends): the request that
  found it compiling still goes first, not the one behind it."""
  eng, gate = gated
  gate.set()
  eng.warmup([(OPTIONS, True)])
  real, calls = eng._pool, []  # pylint: disable=protected-access

  def pool(dec):
    calls.append(dec)
    return None if len(calls) == 1 else real(dec)  # Still compiling at the first look.
  monkeypatch.setattr(eng, "_pool", pool)
  done_order = []
  first, second = eng.submit(_request(3)), eng.submit(_request(2))
  for f in (first, second):
    f.add_done_callback(done_order.append)
  eng.start()
  for f in (first, second):
    f.result(timeout=20)
  assert done_order == [first, second]


# --- the slot pool itself (the tiny model) ---------------------------------------------------

@pytest.fixture(scope="module")
def ar_pool(tiny_decoder):
  """A 2-slot AR pool of the tiny model: 16-token canvases, prompts up to 8 tokens."""
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id)
  return pool_lib.SlotPool(model, params, pool_lib.Decoder(opts, "ar"), 2, 16, 8)


@pytest.mark.parametrize("max_prompt", [0, 16])
def test_a_max_prompt_no_prompt_fits_is_refused_naming_it(tiny_decoder, max_prompt):
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id)
  with pytest.raises(ValueError, match=f"max_prompt must be in .*got {max_prompt}"):
    pool_lib.SlotPool(model, params, pool_lib.Decoder(opts, "ar"), 1, 16, max_prompt)


def test_a_full_pool_says_so_and_a_bad_slot_frees_nothing(ar_pool):
  """Admitting into a full pool names the cause; a slot out of range (a negative one
  wraps to another row in Python and JAX alike) is refused and every row keeps going."""
  slots = [ar_pool.admit(PROMPT, 4, seed) for seed in (1, 2)]
  try:
    assert slots == [0, 1]
    with pytest.raises(RuntimeError, match="no free slot: all 2 slots"):
      ar_pool.admit(PROMPT, 4)
    for bad in (-1, 2):
      for stop in (ar_pool.retire, ar_pool.release):
        with pytest.raises(ValueError, match=f"slot must be in \\[0, 1\\], got {bad}"):
          stop(bad)
    assert ar_pool.occupied == [True, True]
    view = ar_pool.advance()
    assert not view.done.any()  # Neither row was stopped by the refused calls.
  finally:
    for s in (0, 1):
      ar_pool.retire(s)


@pytest.mark.parametrize("kw,field", [({"forwards_per_call": 0}, "forwards_per_call"),
                                      ({"block_size": 0}, "block_size")])
def test_engine_settings_no_request_could_run_with_are_refused(kw, field):
  args = {"block_size": BLOCK, **kw}
  with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
    engine_lib.Engine(None, None, TOK, args.pop("block_size"), MAX_LEN, **args)
