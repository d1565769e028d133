"""A pool of decoding slots: continuous batching at the granularity of one forward.

The pool holds one decoder's loop state for a batch of ``slots`` rows on the device: the
block decoder's ``sampling.state.DecodeState``, the AR decoder's ``sampling.ar.ARState``
or ISD's ``sampling.isd.ISDState``, with one sampling key per row. Three compiled
programs drive it:

* ``admit``: the decoder's own prefill of one request (a batch-1 canvas at a bucketed
  prefill width), written into the row of a free slot;
* ``advance``: one forward of the batch -- the decoder's own step function -- and a small
  host view (done, final length, NFE, tokens);
* ``retire``: marks a slot done (a client that left, a request past its time limit).

A request therefore joins at the next forward after a slot frees, and leaves as soon as
it is done. The decoders keep all progress per row (a row never attends to another and
each advances at its own pace), and each row samples from its own key folded with its
own forward count (``sampling.keys``), so a row's tokens do not depend on its slot mates
or on when it arrived, greedy or sampled with its seed.

Rows in different phases share each forward, which runs the widest window any of them
needs (``step.denoise_step``: the commit window while some row commits a block, else the
whole block, else only the sub-blocks): a row may run a wider forward than alone. That
costs compute, not results: slots a row does not need are attended by nothing and write
nothing, so its outputs change only by float rounding, as with any other batch shape
(on the tiny test model: token probabilities within 1.1e-7 of the row alone, every token
equal).

No recompilation per request: canvases have a fixed width, and the prefill width is the
smallest of a few buckets (multiples of the block size, doubling) that holds the
prompt, so a pool compiles ``advance``, ``retire`` and one ``admit`` per bucket, all at
``warmup``.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax.model import sharding
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import isd as isd_lib
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib

P = jax.sharding.PartitionSpec
Array = Any
KINDS = ("block", "ar", "isd")

JIT_CACHE = jit_cache.JitCache(maxsize=64)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Which decoder a pool runs (static: one set of compiled programs per value).

  Attributes:
    options: decoding options (policy, sampling, sub-blocks, editing, ids).
    kind: "block" (block diffusion), "ar" (one token per forward) or "isd" (I-DLM
      introspective strided decoding; needs a token-shifted model).
    stride: ISD's stride N (>= 2); 0 for the other kinds.
  """

  options: layout.DecodeOptions
  kind: str = "block"
  stride: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"decoder kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "isd":
      if self.stride < 2:
        raise ValueError(f"isd_stride must be >= 2, got {self.stride}")
      if not self.options.token_shift:
        raise ValueError("ISD needs a token-shifted model (diffusion.token_shift=True)")
    elif self.stride:
      raise ValueError(f"stride is ISD's; got stride={self.stride} with kind={self.kind!r}")

  @property
  def slack(self) -> int:
    """Canvas slots past the context that ISD's last forward may touch."""
    return 2 * self.stride if self.kind == "isd" else 0


# --- one row, as each decoder defines it --------------------------------------------------

def _prefill(logits_fn, dec: Decoder, prefill_len: int, params, tokens, maskable, length,
             start_block, rng):
  """The decoder's own initial state of a batch; ``rng`` [B] keys, one per row."""
  opt = dec.options
  if dec.kind == "block":
    return state_lib.init_state(logits_fn, params,
                                layout.Canvas(tokens, maskable, length, start_block), opt,
                                prefill_len, rng)
  prompt_len = jnp.argmax(maskable, axis=1).astype(jnp.int32)
  if dec.kind == "ar":
    return ar_lib.init(logits_fn, opt, prefill_len, params, tokens, prompt_len, length, rng)
  return isd_lib.init(logits_fn, opt, dec.stride, prefill_len, params, tokens, prompt_len,
                      length, rng)


def _step(logits_fn, dec: Decoder, params, st):
  if dec.kind == "block":
    return step_lib.denoise_step(logits_fn, params, st, dec.options)[0]
  if dec.kind == "ar":
    return ar_lib.step(logits_fn, dec.options, params, st)
  return isd_lib.step(logits_fn, dec.options, dec.stride, params, st)


def _done(dec: Decoder, st) -> Array:
  return st.rows.done if dec.kind == "block" else st.done


def _with_done(dec: Decoder, st, done: Array):
  if dec.kind == "block":
    return st.replace(rows=st.rows.replace(done=done))
  return st.replace(done=done)


def _view(dec: Decoder, st) -> dict:
  """What the host reads after a forward: all [B] but ``tokens`` [B, S]."""
  done = _done(dec, st)
  if dec.kind == "block":
    # A block is final once the row moved past it; a stopped row is final everywhere.
    final = jnp.where(done, st.length, st.rows.block * dec.options.block_size)
    nfe = st.counters.nfe
  else:
    final, nfe = st.final, st.nfe
  return {"done": done, "final": final, "nfe": nfe, "tokens": st.tokens}


# --- the pool's compiled programs -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Key:
  logits_fn: Any
  decoder: Decoder
  program: str  # "admit", "advance" or "retire".
  prefill_len: int
  explicit_mesh: bool
  forwards_per_call: int = 1


def _replicated(fn, *args):
  """Under Explicit mesh axes: GSPMD lays the loop out; every output comes back replicated."""
  out = jax.eval_shape(fn, *args)
  return jax.sharding.auto_axes(fn, out_sharding=jax.tree.map(lambda _: P(), out))


def insert_row(pool: Any, row: Any, slot: Array) -> Any:
  """Writes a batch-1 state ``row`` into row ``slot`` of the batch state ``pool``.

  Each leaf's batch axis is the one where the two differ (the KV cache keeps layers
  first); scalars (batch counters) keep the pool's value, and with one slot the row
  replaces the pool.
  """
  def put(p, r):
    if p.ndim == 0:
      return p
    diff = [a for a in range(p.ndim) if p.shape[a] != r.shape[a]]
    if not diff:
      return r
    if len(diff) > 1 or r.shape[diff[0]] != 1:
      raise ValueError(f"row leaf {r.shape} does not fit pool leaf {p.shape}")
    return jax.lax.dynamic_update_index_in_dim(p, r, slot, diff[0])
  return jax.tree.map(put, pool, row)


def _build(key: _Key):
  fn_, dec = key.logits_fn, key.decoder
  if key.program == "admit":
    def admit(params, pool, tokens, maskable, length, start_block, rng, slot):
      row = _prefill(fn_, dec, key.prefill_len, params, tokens, maskable, length,
                     start_block, rng)
      return insert_row(pool, row, slot)
    fn = admit
  elif key.program == "advance":
    def advance(params, pool):
      done0 = _done(dec, pool)
      pool = _step(fn_, dec, params, pool)
      if key.forwards_per_call > 1:
        # More forwards in one call (fewer host round trips), until a row finishes so
        # its slot can take the next request.
        def more(c):
          n, st = c
          d = _done(dec, st)
          return (n < key.forwards_per_call) & ~jnp.any(d & ~done0) & ~jnp.all(d)
        n, pool = jax.lax.while_loop(
            more, lambda c: (c[0] + 1, _step(fn_, dec, params, c[1])), (jnp.int32(1), pool))
      else:
        n = jnp.int32(1)
      return pool, {**_view(dec, pool), "forwards": n}
    fn = advance
  else:
    def retire(pool, slot):
      return _with_done(dec, pool, _done(dec, pool).at[slot].set(True))
    fn = retire
  if key.explicit_mesh:
    compiled = {}

    def call(*a):  # Output shardings need the output's structure: built on first use.
      if "fn" not in compiled:
        compiled["fn"] = jax.jit(_replicated(fn, *a))
      return compiled["fn"](*a)
    return call
  return jax.jit(fn, donate_argnums=(0,) if key.program == "retire" else (1,))


def _replicated_like(params: Any) -> jax.sharding.Sharding:
  """A replicated sharding on the devices that hold ``params``."""
  sh = jax.tree.leaves(params)[0].sharding
  if isinstance(sh, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sh.mesh, P())
  return jax.sharding.SingleDeviceSharding(next(iter(sh.device_set)))


def prefill_buckets(block_size: int, max_prompt: int) -> tuple[int, ...]:
  """Prefill widths: block multiples doubling from one block, up to one that holds
  ``max_prompt`` tokens (any prompt fits the last).

  Doubling, not ``jit_cache.bucket``'s four widths per octave: over prompt lengths
  spread evenly up to a 2048 context (block 16) it prefills 25% padding against 7%, but
  compiles 8 admit programs against 24, all at ``warmup`` (three times the compiles); a
  prefill runs once per request, the forwards that follow dominate a request's compute.
  """
  top = -(-max_prompt // block_size) * block_size
  out, w = [], block_size
  while w < top:
    out.append(w)
    w *= 2
  return tuple(out) + (top,)


@dataclasses.dataclass
class HostView:
  """The pool after a forward, on the host (all [slots] but ``tokens`` [slots, S])."""

  done: np.ndarray
  final: np.ndarray
  nfe: np.ndarray
  tokens: np.ndarray
  forwards: int = 1


class SlotPool:
  """``slots`` rows of one decoder, advanced one forward at a time.

  Usage: ``slot = pool.admit(prompt_ids, max_tokens, seed)``; ``view = pool.advance()`` until
  ``view.done[slot]``; ``pool.release(slot)`` (or ``pool.retire(slot)`` to stop early).
  Not thread-safe: one thread (the engine's worker) drives it.
  """

  def __init__(self, model: Any, params: Any, decoder: Decoder, slots: int, width: int,
               max_prompt: int, forwards_per_call: int = 1):
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    if forwards_per_call < 1:
      raise ValueError(f"forwards_per_call must be >= 1, got {forwards_per_call}")
    if not 1 <= max_prompt < width:
      # A prompt needs a canvas slot for at least one new token; below 1 no prompt fits.
      raise ValueError(f"max_prompt must be in [1, width - 1] = [1, {width - 1}], got "
                       f"{max_prompt}")
    self.logits_fn = logits_lib.as_logits_fn(model)
    self.params, self.decoder, self.slots, self.width = params, decoder, slots, width
    bk = decoder.options.block_size
    self.max_prompt = max_prompt
    self.buckets = prefill_buckets(bk, max_prompt)
    self.occupied: list[bool] = [False] * slots
    self.forwards = 0
    explicit = sharding.explicit_mesh() is not None
    self._key = lambda program, n=0: _Key(self.logits_fn, decoder, program, n, explicit,
                                          forwards_per_call if program == "advance" else 1)
    # The pool's own references to its programs: JIT_CACHE's LRU (other pools, other
    # decoders) may drop one, and rebuilding it would compile on the engine's worker.
    self._programs: dict[tuple[str, int], Any] = {}
    # Every slot starts as a stopped one-token row (the pool's shapes, nothing to do).
    idle = [jnp.repeat(x, slots, axis=0) for x in self._row(np.array([0], np.int32), 1)]
    shapes = jax.eval_shape(lambda *a: _prefill(self.logits_fn, decoder, self.buckets[0],
                                                params, *a),
                            *idle, jax.random.split(jax.random.key(0), slots))
    state = jax.tree.map(
        lambda x: (jax.random.split(jax.random.key(0), x.shape)
                   if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                   else jnp.zeros(x.shape, x.dtype)), shapes)
    # Placed where the programs' outputs live (beside the params, replicated), so the
    # first call sees the same input placement as every later one: one compile each.
    self._state = jax.device_put(state, _replicated_like(params))
    for s in range(slots):
      self._state = self._run("retire", self._state, jnp.int32(s))

  def _row(self, prompt: np.ndarray, max_tokens: int) -> tuple:
    dec = self.decoder
    opt = dec.options
    c = layout.generation_canvas([np.asarray(prompt, np.int32)], max_tokens, opt.block_size,
                                 opt.mask_id, self.width, self.width)
    tokens = c.tokens
    if dec.slack:  # ISD's last forward may run past the end: MASK slack.
      tokens = np.concatenate([tokens, np.full((1, dec.slack), opt.mask_id, np.int32)], 1)
    return (jnp.asarray(tokens, jnp.int32), jnp.asarray(c.maskable, bool),
            jnp.asarray(c.length, jnp.int32), jnp.asarray(c.start_block, jnp.int32))

  def _run(self, program: str, *args, prefill_len: int = 0):
    fn = self._programs.get((program, prefill_len))
    if fn is None:
      fn = self._programs[program, prefill_len] = JIT_CACHE.get(
          self._key(program, prefill_len), _build)
    return fn(*args)

  def bucket(self, prompt_len: int) -> int:
    """The prefill width of a prompt of ``prompt_len`` tokens (1 to ``max_prompt``)."""
    if not 1 <= prompt_len <= self.max_prompt:
      raise ValueError(f"prompt of {prompt_len} tokens; this pool takes 1 to "
                       f"{self.max_prompt}")
    need = (prompt_len // self.decoder.options.block_size * self.decoder.options.block_size
            if self.decoder.kind == "block" else prompt_len)
    return next(b for b in self.buckets if b >= need)

  @property
  def free(self) -> int:
    return self.occupied.count(False)

  @property
  def busy(self) -> bool:
    return any(self.occupied)

  def admit(self, prompt: np.ndarray, max_tokens: int, seed: int = 0) -> int:
    """Prefills a request into a free slot; returns the slot.

    Raises:
      RuntimeError: no slot is free (``release`` or ``retire`` one first).
      ValueError: the prompt or ``max_tokens`` does not fit the pool.
    """
    if not self.free:
      raise RuntimeError(f"no free slot: all {self.slots} slots hold a request; release or "
                         "retire one first")
    slot = self.occupied.index(False)
    prompt = np.asarray(prompt, np.int32)
    self._state = self._run("admit", self.params, self._state,
                            *self._row(prompt, max_tokens), keys.seed_key(seed)[None],
                            jnp.int32(slot), prefill_len=self.bucket(len(prompt)))
    self.occupied[slot] = True
    return slot

  def advance(self) -> HostView:
    """One forward of every slot (up to ``forwards_per_call`` until a row finishes);
    returns what the host needs to stream and finish rows."""
    self._state, view = self._run("advance", self.params, self._state)
    view = jax.device_get(view)
    self.forwards += int(view["forwards"])
    return HostView(done=np.asarray(view["done"]), final=np.asarray(view["final"]),
                    nfe=np.asarray(view["nfe"]), tokens=np.asarray(view["tokens"]),
                    forwards=int(view["forwards"]))

  def retire(self, slot: int) -> None:
    """Stops a slot's row now (it computes nothing more that anyone reads) and frees it."""
    self._check_slot(slot)
    self._state = self._run("retire", self._state, jnp.int32(slot))
    self.occupied[slot] = False

  def release(self, slot: int) -> None:
    """Frees the slot of a row that is done."""
    self._check_slot(slot)
    self.occupied[slot] = False

  def _check_slot(self, slot: int) -> None:
    # A negative index would free (and stop) another row: Python and JAX both wrap it.
    if not 0 <= slot < self.slots:
      raise ValueError(f"slot must be in [0, {self.slots - 1}], got {slot}")

  def warmup(self) -> None:
    """Compiles every program (an admit per prefill bucket), leaving the pool idle."""
    compiled = set()
    # Up to max_prompt, not the canvas width: that is rounded up to a block multiple and
    # may exceed the longest prompt (and the widest bucket) by up to a block.
    for prompt_len in range(1, self.max_prompt + 1):
      n = self.bucket(prompt_len)
      if n not in compiled:
        compiled.add(n)
        self.retire(self.admit(np.zeros((prompt_len,), np.int32), 1))
    self.advance()
