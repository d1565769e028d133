"""One denoising step of the block decoder: one forward of the batch, every row at its pace.

Window. The widest forward input is ``[previous block CLEAN ; current block NOISY]``.
The clean half is real only on the forward right after a row finished its previous
block: that forward commits the block's clean K/V to the cache (exactly once; the exact
block cache) while it denoises the next one, so commits cost no extra forward. Each step
runs the narrowest window that serves every row of the batch (``narrow_window``): the
commit window when some row commits, else the current block alone, else (sub-blocks,
no row refreshing its buffer) only each row's sub-block. Slots a row does not need have
negative segment ids: nothing attends to them and nothing is written. At batch 1 most
sub-block steps run ``sub_block_size`` (+1) slots instead of ``2 * block_size``.

Sub-blocks (Fast-dLLM v2). With ``sub_block_size = b < block_size`` a row fills its
block sub-block by sub-block. The first step of a sub-block runs the whole noisy block
and stores its K/V in the cache's block buffer; the following steps of that sub-block
make only its b tokens valid in the window and read the rest of the block from the
buffer (refreshed on each sub-block's first step, not while the sub-block changes). A
row skips sub-blocks with nothing to fill. Rows are independent: a row that finished
its sub-block or block moves on at once instead of waiting for the slowest row.

Steps. Each step proposes a token for every position (greedy or sampled; MASK never
proposed), the policy picks which MASK positions of the current (sub-)block to fill, and
with editing (LLaDA 2.1) an already generated token is rewritten when the argmax
differs and its probability exceeds ``edit_threshold``. A (sub-)block ends when no MASK
is left (and, with editing, nothing changed for ``patience`` steps), and at the latest
after its step cap, whose last step fills every remaining MASK.

Token shift (Fast-dLLM v2: a pretrained AR model adapted to blocks). The output at
position i-1 predicts token i: the window's logits are taken one slot to the left
(the clean previous block's last slot, then the noisy block but its last slot). The
first token of a block is predicted by the last clean token before it; that output is
exact only on the forward that commits the previous block (or from the prefill), so it
is kept in ``state.head`` for the block's later steps. With sub-blocks, the slot just
before the sub-block is also run in the window (its query predicts the sub-block's
first token) instead of being read from the buffer.

Stopping: a row stops once its block reaches its ``length`` or nothing is left to fill
after it, or, with ``stop_at_eos``, after the block in which it produced EOS. Without
editing the row stops as soon as its (sub-)block holds an EOS with no MASK before it
(as Fast-dLLM v2's decoder does): output is cut at the first EOS, so what follows, the
rest of the block's sub-blocks included, is never read.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import state as state_lib

Array = Any
_NEG = -1e30


@flax.struct.dataclass
class Selection:
  """The outcome of one policy step on a (sub-)block of every row.

  Attributes:
    tokens: [B, n] tokens after the step.
    accepted: [B, n] bool, MASK positions filled.
    confidence: [B, n] confidence of the proposed token at each position; at an edited
      position, the probability of the token it was rewritten to.
    changed: [B] bool, some token changed.
    edits: [B] int32, tokens rewritten by editing.
    edited: [B, n] bool, positions rewritten by editing (never MASK positions).
  """

  tokens: Array
  accepted: Array
  confidence: Array
  changed: Array
  edits: Array
  edited: Array


@flax.struct.dataclass
class _Forward:
  """What a step's forward gives, whichever window shape it ran.

  Attributes:
    logits: [B, block_size, V] logits predicting each slot of the current block.
    head: token shift only: the updated ``DecodeState.head``.
    k, v: [L, B, 2 * block_size, Hkv, Dh]: the previous block's clean K/V (committed
      where a row commits), then the current block's noisy K/V (buffered where a row
      refreshes its buffer); zeros where the forward did not run those slots.
    summaries: the updated summary bank (a summary-token model).
    unique_experts: () mean distinct experts per MoE layer (NaN without MoE).
  """

  logits: Array
  head: Array | None
  k: Array
  v: Array
  summaries: Any
  unique_experts: Array


def _unique(stats: dict) -> Array:
  # NaN without MoE (unknown, as the AR and ISD decoders report it), not "0 experts".
  return jnp.asarray(stats.get("unique_experts", jnp.nan), jnp.float32)


def select_tokens(opt: layout.DecodeOptions, x: Array, logits: Array, region: Array,
                  rng: Array, step: Array, active: Array,
                  block_region: Array | None = None, sub: Array = 0) -> Selection:
  """Proposes tokens and lets the policy (and editing) choose what to write.

  Args:
    opt: decoding options.
    x: [B, n] current tokens.
    logits: [B, n, V] their logits.
    region: [B, n] bool, positions the step may fill or edit.
    rng: sampling key of this step (or [B] keys, one per row; see ``keys``).
    step: scalar or [B], steps the (sub-)block already took (the cap's last step fills
      every remaining MASK).
    active: [B] bool, rows that take this step.
    block_region: [B, n] bool, the fillable positions of the whole block when ``region``
      is one of its sub-blocks (default ``region``): ``TopK`` sizes its steps by the
      block, so ``steps`` stays a per-block budget with sub-blocks.
    sub: scalar or [B], the sub-block being filled (its step cap is
      ``opt.sub_step_cap(sub)``).
  """
  b = x.shape[0]
  logits = logits.at[..., opt.mask_id].set(_NEG)
  toks, conf, probs = keys.per_row(lambda k, lg: opt.sampling.propose(lg, k), rng, logits)
  entropy, margin = policies.scores(probs)
  is_mask = x == opt.mask_id
  cand = is_mask & region & active[:, None]
  sized_by = region if block_region is None else block_region
  slots = jnp.sum(sized_by, axis=-1, keepdims=True)
  accept = opt.policy.select(conf, entropy, margin, cand, slots)
  last = jnp.reshape(jnp.asarray(step) + 1 >= opt.sub_step_cap(jnp.asarray(sub)), (-1, 1))
  accept = jnp.where(last, cand, accept)
  new = jnp.where(accept, toks, x)
  edits = jnp.zeros((b,), jnp.int32)
  edit = jnp.zeros_like(accept)
  if opt.editing:
    p_all = jax.nn.softmax(logits, axis=-1)
    top = jnp.argmax(p_all, axis=-1).astype(jnp.int32)
    p_top = jnp.max(p_all, axis=-1)
    edit = (~is_mask & region & active[:, None] & (top != x)
            & (p_top > opt.edit_threshold))
    new = jnp.where(edit, top, new)
    edits = jnp.sum(edit, axis=-1).astype(jnp.int32)
    conf = jnp.where(edit, p_top, conf)
  return Selection(tokens=new, accepted=accept, confidence=conf,
                   changed=jnp.any(new != x, axis=-1), edits=edits, edited=edit)


def _row_slice(x: Array, start: Array, size: int) -> Array:
  """Per-row dynamic slice of [B, S] at slot ``start[b]``."""
  return jax.vmap(lambda row, st: jax.lax.dynamic_slice_in_dim(row, st, size))(x, start)


def _row_update(x: Array, update: Array, start: Array) -> Array:
  """Per-row dynamic update of [B, S] at slot ``start[b]``."""
  fn = lambda row, u, s: jax.lax.dynamic_update_slice_in_dim(row, u, s, axis=0)
  return jax.vmap(fn)(x, update, start)


def first_sub_with_work(opt: layout.DecodeOptions, x: Array, region: Array,
                        start: Array) -> Array:
  """[B] first sub-block index >= ``start`` that still holds a MASK to fill (else num_sub)."""
  b = x.shape[0]
  work = jnp.any((region & (x == opt.mask_id)).reshape(b, opt.num_sub, opt.sub), axis=-1)
  work = work & (jnp.arange(opt.num_sub) >= start[:, None])
  return jnp.where(jnp.any(work, axis=-1), jnp.argmax(work, axis=-1),
                   opt.num_sub).astype(jnp.int32)


def block_done(opt: layout.DecodeOptions, new: Array, region: Array, still: Array,
               step: Array, sub: Array = 0) -> Array:
  """[B] the (sub-)block ``sub`` is finished: nothing masked (and settled), or its cap is
  hit."""
  is_mask = region & (new == opt.mask_id)
  settled = ~jnp.any(is_mask, axis=-1)
  if opt.editing:
    settled = settled & (still >= opt.patience)
  return (settled | (step >= opt.sub_step_cap(jnp.asarray(sub)))
          | eos_settled(opt, new, region))


def eos_settled(opt: layout.DecodeOptions, new: Array, region: Array) -> Array:
  """[B] the (sub-)block holds an EOS with no MASK before it (``stop_at_eos``, no editing).

  The row's answer is then fixed: output is cut at the first EOS, so filling what follows
  (the rest of the sub-block, and later sub-blocks) would only cost forwards. Earlier
  sub-blocks of the block are already filled, since they are decoded in order.
  """
  if not opt.stop_at_eos or opt.editing:
    return jnp.zeros(new.shape[:1], bool)
  is_mask = region & (new == opt.mask_id)
  masks_before = jnp.cumsum(is_mask, axis=-1) - is_mask
  return jnp.any((new == opt.eos_id) & region & (masks_before == 0), axis=-1)


def row_ended(opt: layout.DecodeOptions, st: state_lib.DecodeState, block: Array,
              block_tokens: Array, block_region: Array) -> Array:
  """[B] a row whose ``block`` just finished stops: end of its slots, nothing left, EOS."""
  s = st.tokens.shape[1]
  slot = jnp.arange(s, dtype=jnp.int32)[None]
  later = slot >= ((block + 1) * opt.block_size)[:, None]
  exists = slot < st.length[:, None]
  ended = (((block + 1) * opt.block_size >= st.length)
           | ~jnp.any(st.maskable & exists & later, axis=-1))
  if opt.stop_at_eos:
    ended = ended | jnp.any((block_tokens == opt.eos_id) & block_region, axis=-1)
  return ended


def denoise_step(logits_fn, params, st: state_lib.DecodeState,
                 options: layout.DecodeOptions) -> tuple[state_lib.DecodeState,
                                                         state_lib.StepInfo]:
  """One forward of the batch and one policy step of every active row.

  Call it in a loop until ``state.done.all()`` (``decoder.run`` does so in a
  ``lax.while_loop``); a notebook can call it step by step and watch ``state.tokens``.

  Args:
    logits_fn: see ``logits.LogitsFn``.
    params: its parameters.
    st: the loop state (``state.init_state``).
    options: decoding options (static).

  Returns:
    (the new state, what the step did).
  """
  opt = options
  bk, buffered = opt.block_size, opt.num_sub > 1
  b = st.tokens.shape[0]
  r = st.rows
  ar_bk = jnp.arange(bk, dtype=jnp.int32)
  active = ~r.done
  blk_start = r.block * bk
  blk_pos = blk_start[:, None] + ar_bk
  x = _row_slice(st.tokens, blk_start, bk)
  blk_exists = blk_pos < st.length[:, None]
  blk_region = _row_slice(st.maskable, blk_start, bk) & blk_exists
  if buffered:
    # Entering a sub-block: skip those with nothing to fill. A block with none at all
    # still takes this one forward (it commits the previous block), then finishes.
    sub = jnp.where(r.step == 0, first_sub_with_work(opt, x, blk_region, r.sub), r.sub)
    in_sub = (ar_bk[None] // opt.sub) == sub[:, None]
    # The whole block runs (and refreshes the buffer): on each sub-block's first step,
    # or with the dual cache only on the block's first step.
    full = (r.block_steps == 0) if opt.dual_cache else (r.step == 0)
    idle = sub >= opt.num_sub
    in_window = in_sub
    if opt.token_shift:
      in_window = in_sub | ((ar_bk[None] == sub[:, None] * opt.sub - 1) & (sub[:, None] > 0))
    noisy_ok = blk_exists & (full[:, None] | in_window)
    buffer_valid = blk_exists & ~in_window & ~full[:, None]
  else:
    sub, in_sub = r.sub, jnp.ones((1, bk), bool)
    full, idle = jnp.ones((b,), bool), jnp.zeros((b,), bool)
    noisy_ok, buffer_valid = blk_exists, None
  region = blk_region & in_sub

  prev_start = jnp.maximum(blk_start - bk, 0)
  do_commit = r.commit & active
  view = st.cache.attention_view(buffer_valid)
  if st.summaries is not None:
    view = st.summaries.extend(view)
  shift = int(opt.token_shift)

  def commit_forward():
    # [previous block CLEAN ; current block NOISY]: commits the previous block.
    prev_pos = prev_start[:, None] + ar_bk
    meta = state_lib.token_meta(prev_pos, bk, masks.CLEAN,
                                do_commit[:, None] & (prev_pos < st.length[:, None])).concat(
                                    state_lib.token_meta(blk_pos, bk, masks.NOISY, noisy_ok))
    inp = jnp.concatenate([_row_slice(st.tokens, prev_start, bk), x], axis=1)
    # A summary model: the forward that commits the previous block also gives its slots.
    kw = {} if st.summaries is None else {"summary": "first_block"}
    logits, (k_new, v_new), stats = logits_fn(
        params, inp, meta, view, (bk - 1, bk) if opt.token_shift else (bk, bk), **kw)
    summaries = st.summaries
    if summaries is not None:
      sk, sv = stats.pop("summary_kv")
      summaries = summaries.write(sk, sv, stats.pop("summary_meta"), prev_start // bk,
                                  do_commit)
    head = st.head
    if opt.token_shift:
      head = jnp.where(do_commit[:, None], logits[:, 0], st.head)
      logits = jnp.concatenate([head[:, None].astype(logits.dtype), logits[:, 1:]], axis=1)
    return _Forward(logits=logits, head=head, k=k_new, v=v_new, summaries=summaries,
                    unique_experts=_unique(stats))

  def block_forward():
    # No row commits: only the current block runs (half the slots).
    logits, (k_new, v_new), stats = logits_fn(
        params, x, state_lib.token_meta(blk_pos, bk, masks.NOISY, noisy_ok), view,
        (0, bk - 1) if opt.token_shift else (0, bk))
    if opt.token_shift:
      logits = jnp.concatenate([st.head[:, None].astype(logits.dtype), logits], axis=1)
    zeros = jnp.zeros_like(k_new)
    return _Forward(logits=logits, head=st.head, k=jnp.concatenate([zeros, k_new], axis=2),
                    v=jnp.concatenate([zeros, v_new], axis=2), summaries=st.summaries,
                    unique_experts=_unique(stats))

  def sub_block_forward():
    # No row commits or refreshes its buffer: only each row's sub-block (and, with the
    # shift, the slot before it) runs; the rest of the block is read from the buffer.
    w = opt.sub + shift
    off = jnp.clip(sub * opt.sub - shift, 0, bk - w)
    idx = off[:, None] + jnp.arange(w, dtype=jnp.int32)
    ok = jnp.take_along_axis(noisy_ok, idx, axis=1)
    logits_w, (k_new, _), stats = logits_fn(
        params, _row_slice(x, off, w),
        state_lib.token_meta(blk_start[:, None] + idx, bk, masks.NOISY, ok), view, None)
    # Block position p reads the output at p - shift; outside the window it is unused.
    src = ar_bk[None] - shift - off[:, None]
    inside = (src >= 0) & (src < w)
    logits = jnp.take_along_axis(logits_w, jnp.clip(src, 0, w - 1)[..., None], axis=1)
    logits = jnp.where(inside[..., None], logits, 0.0)
    if opt.token_shift:
      logits = jnp.where((ar_bk == 0)[None, :, None],
                         st.head[:, None].astype(logits.dtype), logits)
    shape = k_new.shape[:2] + (2 * bk,) + k_new.shape[3:]
    zeros = jnp.zeros(shape, k_new.dtype)
    return _Forward(logits=logits, head=st.head, k=zeros, v=zeros, summaries=st.summaries,
                    unique_experts=_unique(stats))

  # One forward shape per step, the narrowest that serves every row (rows at other
  # phases force the wider one); each gives the same outputs for the slots it runs.
  if not opt.narrow_window:
    fwd = commit_forward()
  elif buffered:
    pick = jnp.where(jnp.any(do_commit), 0, jnp.where(jnp.any(full & active), 1, 2))
    fwd = jax.lax.switch(pick, [commit_forward, block_forward, sub_block_forward])
  else:
    fwd = jax.lax.cond(jnp.any(do_commit), commit_forward, block_forward)
  logits, head, summaries = fwd.logits, fwd.head, fwd.summaries
  exists = jnp.arange(st.tokens.shape[1])[None] < st.length[:, None]
  cache = st.cache.commit(fwd.k[:, :, :bk], fwd.v[:, :, :bk], prev_start, do_commit, exists)
  if buffered:
    cache = cache.write_buffer(fwd.k[:, :, bk:], fwd.v[:, :, bk:], blk_start, full & active)
  c = st.counters
  forwards = c.forwards + 1
  stepping = active & ~idle
  sel = select_tokens(opt, x, logits, region, keys.step_key(st.rng, forwards, c.nfe),
                      r.step, stepping, blk_region, sub)
  new = sel.tokens
  step = r.step + stepping.astype(jnp.int32)
  block_steps = r.block_steps + stepping.astype(jnp.int32)
  still = jnp.where(sel.changed, 0, r.still + 1)
  sub_done = active & (block_done(opt, new, region, still, step, sub) | idle)
  if buffered:
    nxt = first_sub_with_work(opt, new, blk_region, sub + 1)
    to_next = sub_done & (nxt < opt.num_sub) & ~eos_settled(opt, new, region)
    finished = sub_done & ~to_next
  else:
    nxt, to_next, finished = sub, jnp.zeros((b,), bool), sub_done

  tokens = jnp.where(active[:, None], _row_update(st.tokens, new, blk_start), st.tokens)
  n_blocks = st.tokens.shape[1] // bk
  steps = jnp.where(finished[:, None] & (jnp.arange(n_blocks) == r.block[:, None]),
                    jnp.maximum(block_steps, 1)[:, None], c.steps)
  ended = row_ended(opt, st, r.block, new, blk_region)
  advance = finished & ~ended
  fresh = advance | to_next
  rows = state_lib.RowProgress(
      block=jnp.where(advance, r.block + 1, r.block),
      sub=jnp.where(advance, 0, jnp.where(to_next, nxt, sub)),
      step=jnp.where(fresh, 0, step), block_steps=jnp.where(advance, 0, block_steps),
      still=jnp.where(fresh, 0, still), commit=advance, done=r.done | (finished & ended))
  counters = state_lib.Counters(
      steps=steps, nfe=c.nfe + active.astype(jnp.int32), edits=c.edits + sel.edits,
      forwards=forwards,
      unique_experts=c.unique_experts + fwd.unique_experts)
  info = state_lib.StepInfo(block=r.block, tokens=new, accepted=sel.accepted & stepping[:, None],
                            confidence=sel.confidence, active=stepping, finished=finished,
                            edited=sel.edited & stepping[:, None])
  return st.replace(tokens=tokens, cache=cache, rows=rows, counters=counters,
                    head=head, summaries=summaries), info
