"""The jit-compiled block-diffusion decoder: one ``lax.while_loop`` over fixed-shape buffers.

Layout. Every row of the batch is a *canvas* of ``S`` token slots (a multiple of the block
size) holding, at absolute positions 0.., the prompt, MASK tokens where text is to be
generated, and fixed tokens elsewhere (infilling). Blocks are aligned to position 0 exactly
as in training (``block_ids = positions // block_size``), so a prompt that ends mid-block
is handled the way training saw it: its last, partial block becomes the first noisy block
and its prompt tokens stay there as fixed (never masked, never edited) tokens. Rows of
different prompt lengths therefore sit in different blocks at the same loop iteration;
all metadata is per row, and a row never attends to another row, so a row's output does
not depend on its batch mates. Slots at or past a row's ``length`` get a negative segment
id and are never attended.

Cache. ``k``/``v`` of shape [L, B, S(+block), Hkv, Dh]; slot i holds position i (so the
cache needs no per-row offsets; writes are per-row dynamic-update-slices at the row's own
block). Blocks before a row's ``start_block`` are prefilled in one block-causal clean
pass. A finished block is committed exactly once (exact block cache): its clean K/V are
computed in the first forward of the row's *next* block, whose input is ``[finished
block as CLEAN ; new block as NOISY]`` -- the noisy block sees the clean block through
the ordinary mask, so the commit costs no extra forward (``commit_passes`` is 0 and TPF
needs no caveat). The last block is never committed (nothing reads it).

Per-row progress (whole-block steps). Each row has its own current block, step count and
done flag, and every forward of the batch (one ``while_loop`` iteration) runs, per row,
the fixed-shape window ``[previous block CLEAN ; current block NOISY]``. The clean half
is real only on the forward right after the row finished its previous block; otherwise
its slots get negative segment ids (nothing attends to them, nothing is written). So a
fast row moves on at once instead of idling until the slowest row finishes the same
block index: the batch takes ``forwards == max over rows of NFE`` sequential forwards
rather than the sum over block indices of the slowest row's steps. The price is a
2-block window on every forward instead of 1 block on the non-first steps of a block.

Sub-blocks (Fast-dLLM v2). With ``sub_block_size = b < block_size`` the block is filled
sub-block by sub-block, on a separate *lockstep* path: all rows move through the same
block index together (a ``while_loop`` over blocks, then over sub-blocks and steps), so
a block costs the slowest row's steps and a finished row waits frozen. The first step
of each sub-block runs the whole noisy block and stores its K/V in a block buffer (the
last ``block_size`` cache slots, stream NOISY); the following steps run only the b
tokens of the current sub-block and read the rest of the block (the finished sub-blocks
and the still-masked later ones) from that buffer. This is the Fast-dLLM approximation:
the buffered K/V are those of the sub-block's first step and are not updated while the
current sub-block changes.

Steps. Each step proposes a token for every position (greedy or sampled, MASK never
proposed), the policy picks which MASK positions of the current (sub-)block to fill, and
with editing enabled (LLaDA 2.1) an already generated token is rewritten when the argmax
differs and its probability exceeds ``edit_threshold``. A (sub-)block exits early when
no MASK is left (and, with editing, nothing changed for ``patience`` steps), and at the
latest after its step cap, whose last step fills every remaining MASK. A row that is
finished is frozen (it still occupies its batch slot in the forward, which is all it
costs).

Stopping: a row stops once its block reaches its ``length``, or, with ``stop_at_eos``,
after the block in which it produced EOS. On the per-row path without editing a row
stops as soon as its block holds an EOS with no MASK before it: the slots after that EOS
may stay MASK, since output is cut at the first EOS. The loop stops when every row has
stopped.

Streaming: ``on_block`` (a host function) is called with ``jax.debug.callback(...,
ordered=True)`` when blocks finish: on the lockstep path once per block index; on the
per-row path inside a ``lax.cond``, only on forwards where some row finished a block
(``active`` marks those rows), so there is no host round trip on the other steps; the
alternative, a jitted per-block function driven by a Python loop, would add a
dispatch and a sync per block as well but cannot overlap them, so the callback wins.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax.model import masks
from blockdiff_jax.model import sharding
from blockdiff_jax.sampling import policies

P = jax.sharding.PartitionSpec

Array = Any
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Static options of the block decoder.

  Attributes:
    block_size: tokens per diffusion block (the model's training block size).
    mask_id: the MASK token id.
    eos_id: the EOS token id.
    policy: which MASK positions to fill per step.
    sampling: greedy or temperature / top-k / top-p proposals.
    sub_block_size: 0 or block_size = whole-block steps; else the sub-block size.
    max_steps_per_block: step cap per block (split evenly over sub-blocks); 0 = one step
      per token (plus ``patience`` with editing), enough for any policy.
    edit_threshold: tau_edit of token editing; 0 = editing off.
    patience: with editing, steps without any change before a block exits.
    stop_at_eos: stop a row after the block in which it generated EOS.
  """

  block_size: int
  mask_id: int
  eos_id: int
  policy: policies.Policy = policies.Threshold()
  sampling: policies.Sampling = policies.Sampling()
  sub_block_size: int = 0
  max_steps_per_block: int = 0
  edit_threshold: float = 0.0
  patience: int = 1
  stop_at_eos: bool = True

  def __post_init__(self):
    if self.block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    if self.sub_block_size < 0 or (self.sub_block_size and
                                   self.block_size % self.sub_block_size):
      raise ValueError(f"sub_block_size={self.sub_block_size} must divide "
                       f"block_size={self.block_size} (or be 0)")
    if self.max_steps_per_block < 0:
      raise ValueError(f"max_steps_per_block must be >= 0, got {self.max_steps_per_block}")
    if not 0.0 <= self.edit_threshold <= 1.0:
      raise ValueError(f"edit_threshold must be in [0, 1], got {self.edit_threshold}")
    if self.patience < 1:
      raise ValueError(f"patience must be >= 1, got {self.patience}")

  @property
  def sub(self) -> int:
    return self.sub_block_size or self.block_size

  @property
  def num_sub(self) -> int:
    return self.block_size // self.sub

  @property
  def editing(self) -> bool:
    return self.edit_threshold > 0

  @property
  def step_cap(self) -> int:
    """Steps allowed per sub-block."""
    if self.max_steps_per_block:
      return max(1, self.max_steps_per_block // self.num_sub)
    return self.sub + (self.patience if self.editing else 0)


@dataclasses.dataclass(frozen=True)
class Canvas:
  """Host-side (numpy) input of the decoder; see the module docstring.

  Attributes:
    tokens: [B, S] int32 token slots (MASK where the decoder fills).
    maskable: [B, S] bool, the slots the decoder may write.
    length: [B] int32, slots < length exist.
    start_block: [B] int32, first block that is decoded; earlier blocks are prefilled.
  """

  tokens: np.ndarray
  maskable: np.ndarray
  length: np.ndarray
  start_block: np.ndarray


def _apply(model, params, tokens, meta, cache=None, logits_slice=None):
  return model.apply({"params": params}, tokens, meta, cache=cache, return_kv=True,
                     logits_slice=logits_slice)


def _row_slice(x: Array, start: Array, size: int) -> Array:
  """Per-row dynamic slice of [B, S] at slot ``start[b]``."""
  fn = lambda row, st: jax.lax.dynamic_slice_in_dim(row, st, size, axis=0)
  return jax.vmap(fn)(x, start)


def _row_update(x: Array, update: Array, start: Array) -> Array:
  """Per-row dynamic update of [B, S, ...] at slot ``start[b]``."""
  fn = lambda row, u, s: jax.lax.dynamic_update_slice_in_dim(row, u, s, axis=0)
  return jax.vmap(fn)(x, update, start)


def _cache_update(c: Array, update: Array, start: Array) -> Array:
  """Writes update [L, B, T, H, D] into cache [L, B, S, H, D] at slot ``start[b]``."""
  fn = lambda row, u, s: jax.lax.dynamic_update_slice_in_dim(row, u, s, axis=1)
  return jax.vmap(fn, in_axes=(1, 1, 0), out_axes=1)(c, update, start)


def _cache_slice(c: Array, start: Array, size: int) -> Array:
  """Reads [L, B, size, H, D] from cache [L, B, S, H, D] at slot ``start[b]``."""
  fn = lambda row, st: jax.lax.dynamic_slice_in_dim(row, st, size, axis=1)
  return jax.vmap(fn, in_axes=(1, 0), out_axes=1)(c, start)


def _meta(positions: Array, block_size: int, stream: int, valid: Array,
          block_ids: Array | None = None) -> masks.TokenMeta:
  meta = masks.make_meta(positions, block_size, stream, jnp.where(valid, 0, -1))
  if block_ids is not None:
    meta = dataclasses.replace(meta, block_ids=block_ids)
  return meta


def _moe_unique(aux: dict) -> Array:
  moe = aux.get("moe") or {}
  if "unique_experts" not in moe:
    return jnp.float32(0.0)
  return jnp.mean(moe["unique_experts"])


def _propose_and_select(opt: DecodeOptions, x: Array, logits: Array, cand_region: Array,
                        rng: Array, step: Array, active: Array) -> tuple[Array, Array, Array]:
  """One policy step on a (sub-)block of every row.

  Args:
    opt: decoding options.
    x: [B, n] current tokens of the (sub-)block.
    logits: [B, n, V] logits of those positions.
    cand_region: [B, n] bool, positions the decoder may fill or edit.
    rng: sampling key of this step.
    step: scalar or [B], steps this (sub-)block already took (the cap fills the rest).
    active: [B] bool, rows that take this step.

  Returns:
    (new x, changed [B], edits [B]).
  """
  b = x.shape[0]
  logits = logits.at[..., opt.mask_id].set(_NEG)
  toks, conf, probs = opt.sampling.propose(logits, rng)
  entropy, margin = policies.scores(probs)
  is_mask = x == opt.mask_id
  cand = is_mask & cand_region & active[:, None]
  slots = jnp.sum(cand_region, axis=-1, keepdims=True)
  accept = opt.policy.select(conf, entropy, margin, cand, slots)
  last = jnp.reshape(jnp.asarray(step) + 1 >= opt.step_cap, (-1, 1))
  accept = jnp.where(last, cand, accept)
  new = jnp.where(accept, toks, x)
  edits = jnp.zeros((b,), jnp.int32)
  if opt.editing:
    p_all = jax.nn.softmax(logits, axis=-1)
    top = jnp.argmax(p_all, axis=-1).astype(jnp.int32)
    p_top = jnp.max(p_all, axis=-1)
    edit = (~is_mask & cand_region & active[:, None] & (top != x)
            & (p_top > opt.edit_threshold))
    new = jnp.where(edit, top, new)
    edits = jnp.sum(edit, axis=-1).astype(jnp.int32)
  changed = jnp.any(new != x, axis=-1)
  return new, changed, edits


def decode(model, params, canvas: Canvas, options: DecodeOptions, rng: Array | None = None,
           on_block: Callable[..., None] | None = None,
           prefill_width: int | None = None,
           on_step: Callable[..., None] | None = None) -> dict:
  """Runs the block decoder on a canvas; returns numpy results.

  Args:
    model: a ``Transformer``.
    params: its parameters.
    canvas: the host-side input (see ``Canvas``; built by ``layout``).
    options: static decoding options.
    rng: PRNG key for sampling (default key 0).
    on_block: optional host callback ``on_block(block_index [B], tokens [B, block],
      active [B])`` invoked when decoded blocks finish; each row's blocks arrive once
      each, in order, on calls where that row is ``active``.
    on_step: optional host callback ``on_step(block_index [B], tokens [B, block])``
      after every denoising step (for visualizing; it syncs with the host per step).
    prefill_width: static width of the prefill pass (default: the largest start
      block's offset); fix it to share compiles and shapes across batches.

  Returns:
    dict with ``tokens`` [B, S], ``steps`` [B, S // block] (denoising steps each block
    used; 0 for blocks not decoded), ``nfe`` [B] (forwards while the row was active),
    ``forwards`` (forward passes of the batch, prefill excluded), ``prefill_passes``,
    ``commit_passes`` (0: commits ride along with the next block's first step),
    ``edits`` [B] and ``unique_experts`` (mean per MoE layer per forward).
  """
  b, s = canvas.tokens.shape
  bk = options.block_size
  if s % bk:
    raise ValueError(f"canvas width {s} is not a multiple of block_size {bk}")
  prefill_len = int(np.max(canvas.start_block)) * bk
  if prefill_width is not None:
    if prefill_width < prefill_len or prefill_width % bk or prefill_width > s:
      raise ValueError(f"prefill_width={prefill_width} must be a multiple of {bk} in "
                       f"[{prefill_len}, {s}]")
    prefill_len = prefill_width
  rng = jax.random.key(0) if rng is None else rng
  fn = _decode_fn(model, options, prefill_len, on_block, on_step)
  out = fn(params, jnp.asarray(canvas.tokens, jnp.int32), jnp.asarray(canvas.maskable, bool),
           jnp.asarray(canvas.length, jnp.int32), jnp.asarray(canvas.start_block, jnp.int32),
           rng)
  out = jax.device_get(out)
  out["prefill_passes"] = int(prefill_len > 0)
  out["commit_passes"] = 0
  return out


_CACHE: dict = {}


def _decode_fn(model, options, prefill_len, on_block, on_step):
  explicit = sharding.explicit_mesh() is not None
  key = (model, options, prefill_len, on_block, on_step, explicit)
  if key not in _CACHE:
    fn = lambda *a: _decode(model, options, prefill_len, on_block, on_step, *a)
    if explicit:
      # Under Explicit mesh axes the loop (per-row dynamic slices of replicated
      # canvases mixed with batch-split model outputs) runs with GSPMD choosing
      # layouts; the small results come back replicated.
      fn = jax.sharding.auto_axes(fn, out_sharding={
          "tokens": P(), "steps": P(), "nfe": P(), "forwards": P(), "edits": P(),
          "unique_experts": P()})
    _CACHE[key] = jax.jit(fn)
  return _CACHE[key]


def _decode(model, opt: DecodeOptions, prefill_len: int, on_block, on_step, *args):
  """Traced body of ``decode``: per-row blocks, or lockstep blocks with sub-blocks."""
  if opt.num_sub > 1:
    return _decode_lockstep(model, opt, prefill_len, on_block, on_step, *args)
  return _decode_async(model, opt, prefill_len, on_block, on_step, *args)


def _prefill(model, opt, prefill_len, params, tokens, length, start_block, width):
  """Clean block-causal pass over the blocks before each row's start block.

  Returns:
    (k cache, v cache, valid [B, S]) with the prefilled slots written.
  """
  cfg = model.cfg
  b, s = tokens.shape
  bk = opt.block_size
  dtype = cfg.compute_dtype
  kv_shape = (cfg.num_layers, b, width, cfg.num_kv_heads, cfg.head_dim)
  slot_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  k_cache = jnp.zeros(kv_shape, dtype)
  v_cache = jnp.zeros(kv_shape, dtype)
  seg_valid = jnp.zeros((b, s), bool)
  if prefill_len:
    valid = ((slot_pos[:, :prefill_len] < (start_block * bk)[:, None])
             & (slot_pos[:, :prefill_len] < length[:, None]))
    meta = _meta(slot_pos[:, :prefill_len], bk, masks.CLEAN, valid)
    _, aux = _apply(model, params, tokens[:, :prefill_len], meta, logits_slice=(0, 1))
    k_cache = k_cache.at[:, :, :prefill_len].set(aux["kv"][0].astype(dtype))
    v_cache = v_cache.at[:, :, :prefill_len].set(aux["kv"][1].astype(dtype))
    seg_valid = seg_valid.at[:, :prefill_len].set(valid)
  return k_cache, v_cache, seg_valid


def _decode_async(model, opt: DecodeOptions, prefill_len: int, on_block, on_step, params,
                  tokens, maskable, length, start_block, rng):
  """Whole-block decoding where every row moves through its blocks at its own pace.

  One ``while_loop`` iteration is one forward of the batch. Each row's window is
  ``[previous block CLEAN ; current block NOISY]``; the clean half is real only on the
  forward right after the row finished that block (it is committed to the cache then,
  once), and otherwise has negative segment ids, so nothing attends to it and its K/V
  slots are left as they were. A row that finishes its block takes one policy step on
  this forward and enters the next block on the following one, so a row never waits for
  its batch mates: the batch takes max over rows of the row's NFE forwards instead of
  the sum over blocks of the slowest row's steps.
  """
  cfg = model.cfg
  b, s = tokens.shape
  bk = opt.block_size
  n_blocks = s // bk
  dtype = cfg.compute_dtype
  slot_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  exists = slot_pos < length[:, None]
  ar_bk = jnp.arange(bk, dtype=jnp.int32)
  k_cache, v_cache, seg_valid = _prefill(model, opt, prefill_len, params, tokens, length,
                                         start_block, s)

  def body(carry):
    (canvas, k_c, v_c, valid, cur, step, still, commit, done, steps, nfe, fwd, ue,
     edits_tot, rng) = carry
    active = ~done
    blk_start = cur * bk
    blk_pos = blk_start[:, None] + ar_bk
    x = _row_slice(canvas, blk_start, bk)
    blk_mask = _row_slice(maskable, blk_start, bk)
    blk_exists = blk_pos < length[:, None]
    prev_start = jnp.maximum(blk_start - bk, 0)
    prev_pos = prev_start[:, None] + ar_bk
    do_commit = commit & active
    prev_ok = do_commit[:, None] & (prev_pos < length[:, None])
    meta = _meta(prev_pos, bk, masks.CLEAN, prev_ok).concat(
        _meta(blk_pos, bk, masks.NOISY, blk_exists))
    inp = jnp.concatenate([_row_slice(canvas, prev_start, bk), x], axis=1)
    cache = {"k": k_c, "v": v_c, "meta": _meta(slot_pos, bk, masks.CLEAN, valid)}
    logits, aux = _apply(model, params, inp, meta, cache, logits_slice=(bk, bk))
    k_new, v_new = aux["kv"]
    # Per-row scatter of the committed block; rows not committing rewrite their own slots.
    keep = lambda c, new: jnp.where(do_commit[None, :, None, None, None], new,
                                    _cache_slice(c, prev_start, bk))
    k_c = _cache_update(k_c, keep(k_c, k_new[:, :, :bk].astype(dtype)), prev_start)
    v_c = _cache_update(v_c, keep(v_c, v_new[:, :, :bk].astype(dtype)), prev_start)
    valid = valid | ((slot_pos // bk == (prev_start // bk)[:, None]) & do_commit[:, None]
                     & exists)
    fwd = fwd + 1
    ue = ue + _moe_unique(aux)
    nfe = nfe + active.astype(jnp.int32)

    region = blk_mask & blk_exists
    new, changed, n_edits = _propose_and_select(opt, x, logits, region,
                                                jax.random.fold_in(rng, fwd), step, active)
    edits_tot = edits_tot + n_edits
    step = step + active.astype(jnp.int32)
    if on_step is not None:
      jax.debug.callback(on_step, cur, new, ordered=True)
    still = jnp.where(changed, 0, still + 1)
    is_mask = region & (new == opt.mask_id)
    no_mask = ~jnp.any(is_mask, axis=-1)
    finished = active & ((no_mask & ((still >= opt.patience) if opt.editing else True))
                         | (step >= opt.step_cap))
    if opt.stop_at_eos and not opt.editing:
      # An EOS with nothing masked before it settles the row: what follows it is never
      # read, so filling it would only cost forwards.
      masks_before = jnp.cumsum(is_mask, axis=-1) - is_mask
      finished = finished | (active & jnp.any((new == opt.eos_id) & region & (masks_before == 0),
                                              axis=-1))
    canvas = jnp.where(active[:, None], _row_update(canvas, new, blk_start), canvas)
    steps = jnp.where(finished[:, None] & (jnp.arange(n_blocks) == cur[:, None]),
                      step[:, None], steps)
    if on_block is not None:
      # Ordered callbacks inside ``cond``: a host round trip only on forwards that finish
      # some row's block.
      jax.lax.cond(jnp.any(finished),
                   lambda: jax.debug.callback(on_block, cur, new, finished, ordered=True),
                   lambda: None)
    # A row ends at its last slot or once nothing is left to fill after this block.
    later = slot_pos >= ((cur + 1) * bk)[:, None]
    ended = ((cur + 1) * bk >= length) | ~jnp.any(maskable & exists & later, axis=-1)
    if opt.stop_at_eos:
      ended = ended | jnp.any((new == opt.eos_id) & region, axis=-1)
    advance = finished & ~ended
    done = done | (finished & ended)
    cur = jnp.where(advance, cur + 1, cur)
    step = jnp.where(advance, 0, step)
    still = jnp.where(advance, 0, still)
    commit = advance
    return (canvas, k_c, v_c, valid, cur, step, still, commit, done, steps, nfe, fwd, ue,
            edits_tot, rng)

  zeros = jnp.zeros((b,), jnp.int32)
  init = (tokens, k_cache, v_cache, seg_valid, start_block, zeros, zeros,
          jnp.zeros((b,), bool), start_block * bk >= length,
          jnp.zeros((b, n_blocks), jnp.int32), zeros, jnp.int32(0), jnp.float32(0.0), zeros,
          rng)
  out = jax.lax.while_loop(lambda c: jnp.any(~c[8]), body, init)
  (canvas, _, _, _, _, _, _, _, _, steps, nfe, fwd, ue, edits_tot, _) = out
  return {"tokens": canvas, "steps": steps, "nfe": nfe, "forwards": fwd, "edits": edits_tot,
          "unique_experts": ue / jnp.maximum(fwd, 1).astype(jnp.float32)}


def _decode_lockstep(model, opt: DecodeOptions, prefill_len: int, on_block, on_step, params,
                     tokens, maskable, length, start_block, rng):
  """Sub-block decoding: all rows move through the same block index together."""
  cfg = model.cfg
  b, s = tokens.shape
  bk, sb, n_sub = opt.block_size, opt.sub, opt.num_sub
  n_blocks = s // bk
  use_buffer = n_sub > 1
  width = s + (bk if use_buffer else 0)
  dtype = cfg.compute_dtype
  slot = jnp.arange(s, dtype=jnp.int32)
  slot_pos = jnp.broadcast_to(slot, (b, s))
  exists = slot_pos < length[:, None]
  k_cache, v_cache, seg_valid = _prefill(model, opt, prefill_len, params, tokens, length,
                                         start_block, width)

  def cache_dict(k_c, v_c, valid, buffer_valid=None, cur=None):
    meta = _meta(slot_pos, bk, masks.CLEAN, valid)
    if use_buffer:
      pos = cur[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)
      bvalid = jnp.zeros((b, bk), bool) if buffer_valid is None else buffer_valid
      meta = meta.concat(_meta(pos, bk, masks.NOISY, bvalid))
    return {"k": k_c, "v": v_c, "meta": meta}

  def propose_and_select(x_sub, logits, cand_region, first_rng, step, active):
    return _propose_and_select(opt, x_sub, logits, cand_region, first_rng, step, active)

  def block_body(carry):
    (j, canvas, k_c, v_c, valid, done, steps, nfe, fwd, ue, edits_tot, rng) = carry
    cur = jnp.minimum(start_block + j, n_blocks - 1)
    blk_start = cur * bk
    blk_pos = blk_start[:, None] + jnp.arange(bk, dtype=jnp.int32)
    x = _row_slice(canvas, blk_start, bk)
    blk_mask = _row_slice(maskable, blk_start, bk)
    blk_exists = blk_pos < length[:, None]
    row_active = ~done

    # First forward of the block: commit the previous block (clean) + denoise this one.
    prev_start = jnp.maximum(blk_start - bk, 0)
    prev_valid = (j > 0) & (cur > start_block)
    prev_pos = prev_start[:, None] + jnp.arange(bk, dtype=jnp.int32)
    prev_ok = prev_valid[:, None] & (prev_pos < length[:, None])
    meta = _meta(prev_pos, bk, masks.CLEAN, prev_ok).concat(
        _meta(blk_pos, bk, masks.NOISY, blk_exists))
    inp = jnp.concatenate([_row_slice(canvas, prev_start, bk), x], axis=1)
    logits, aux = _apply(model, params, inp, meta, cache_dict(k_c, v_c, valid, cur=cur),
                         logits_slice=(bk, bk))
    k_new, v_new = aux["kv"]
    # Rows without a previous decoded block (it was prefilled, or there is none) keep
    # their slots: the clean pass of an invalid block must not overwrite prefilled K/V.
    keep = lambda c, new: jnp.where(prev_valid[None, :, None, None, None], new,
                                    _cache_slice(c, prev_start, bk))
    k_c = _cache_update(k_c, keep(k_c, k_new[:, :, :bk].astype(dtype)), prev_start)
    v_c = _cache_update(v_c, keep(v_c, v_new[:, :, :bk].astype(dtype)), prev_start)
    valid = valid | ((slot_pos // bk == (prev_start // bk)[:, None]) & prev_valid[:, None]
                     & exists)
    if use_buffer:
      k_c = _cache_update(k_c, k_new[:, :, bk:].astype(dtype), jnp.full((b,), s))
      v_c = _cache_update(v_c, v_new[:, :, bk:].astype(dtype), jnp.full((b,), s))
    fwd = fwd + 1
    ue = ue + _moe_unique(aux)
    nfe = nfe + row_active.astype(jnp.int32)

    def sub_body(si, sub_carry):
      (x, k_c, v_c, logits, steps_blk, nfe, fwd, ue, edits_tot, rng) = sub_carry
      off = si * sb
      region = (jnp.arange(bk) >= off) & (jnp.arange(bk) < off + sb)
      sub_mask = jax.lax.dynamic_slice_in_dim(blk_mask & blk_exists, off, sb, axis=1)
      x_sub = jax.lax.dynamic_slice_in_dim(x, off, sb, axis=1)
      has_work = jnp.any(sub_mask & (x_sub == opt.mask_id), axis=-1)
      sub_done = ~row_active | ~has_work

      def step_cond(c):
        return jnp.any(~c[1]) & (c[2] < opt.step_cap)

      def step_body(c):
        (x_sub, sub_done, step, still, k_c, v_c, logits, steps_blk, nfe, fwd, ue,
         edits_tot, rng) = c
        # Every step but the block's very first one needs a fresh forward; the first
        # step of sub-block si > 0 refreshes the whole block (and the buffer).
        def full_block(args):
          x_sub, k_c, v_c = args
          xb = jax.lax.dynamic_update_slice_in_dim(x, x_sub, off, axis=1)
          lg, aux = _apply(model, params, xb, _meta(blk_pos, bk, masks.NOISY, blk_exists),
                           cache_dict(k_c, v_c, valid, cur=cur))
          if use_buffer:
            k_c = _cache_update(k_c, aux["kv"][0].astype(dtype), jnp.full((b,), s))
            v_c = _cache_update(v_c, aux["kv"][1].astype(dtype), jnp.full((b,), s))
          return lg, k_c, v_c, _moe_unique(aux)

        def sub_only(args):
          x_sub, k_c, v_c = args
          pos = blk_start[:, None] + off + jnp.arange(sb, dtype=jnp.int32)
          bvalid = blk_exists & ~region[None]
          lg, aux = _apply(model, params, x_sub,
                           _meta(pos, bk, masks.NOISY, pos < length[:, None]),
                           cache_dict(k_c, v_c, valid, bvalid, cur))
          lg = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, bk) + lg.shape[2:],
                                                             lg.dtype), lg, off, axis=1)
          return lg, k_c, v_c, _moe_unique(aux)

        first_of_block = (si == 0) & (step == 0)
        need_full = (step == 0) | (not use_buffer)

        def fresh(args):
          return jax.lax.cond(need_full, full_block, sub_only, args) if use_buffer else (
              full_block(args))

        def reuse(args):
          return logits, args[1], args[2], jnp.float32(0.0)

        logits, k_c, v_c, ue_step = jax.lax.cond(first_of_block, reuse, fresh,
                                                 (x_sub, k_c, v_c))
        fwd = fwd + jnp.where(first_of_block, 0, 1)
        ue = ue + ue_step
        active = ~sub_done
        nfe = nfe + jnp.where(first_of_block, 0, active.astype(jnp.int32))
        lg_sub = jax.lax.dynamic_slice_in_dim(logits, off, sb, axis=1)
        step_rng = jax.random.fold_in(rng, fwd)
        new, changed, n_edits = propose_and_select(x_sub, lg_sub, sub_mask, step_rng, step,
                                                   active)
        steps_blk = steps_blk + active.astype(jnp.int32)
        if on_step is not None:
          jax.debug.callback(on_step, cur,
                             jax.lax.dynamic_update_slice_in_dim(x, new, off, axis=1),
                             ordered=True)
        edits_tot = edits_tot + n_edits
        still = jnp.where(changed, 0, still + 1)
        no_mask = ~jnp.any(sub_mask & (new == opt.mask_id), axis=-1)
        finished = no_mask & ((still >= opt.patience) if opt.editing else True)
        sub_done = sub_done | finished | (step + 1 >= opt.step_cap)
        return (new, sub_done, step + 1, still, k_c, v_c, logits, steps_blk, nfe, fwd, ue,
                edits_tot, rng)

      init = (x_sub, sub_done, jnp.int32(0), jnp.zeros((b,), jnp.int32), k_c, v_c, logits,
              steps_blk, nfe, fwd, ue, edits_tot, rng)
      out = jax.lax.while_loop(step_cond, step_body, init)
      (x_sub, _, _, _, k_c, v_c, logits, steps_blk, nfe, fwd, ue, edits_tot, rng) = out
      x = jax.lax.dynamic_update_slice_in_dim(x, x_sub, off, axis=1)
      return (x, k_c, v_c, logits, steps_blk, nfe, fwd, ue, edits_tot, rng)

    sub_init = (x, k_c, v_c, logits, jnp.zeros((b,), jnp.int32), nfe, fwd, ue, edits_tot, rng)
    (x, k_c, v_c, _, steps_blk, nfe, fwd, ue, edits_tot, rng) = jax.lax.fori_loop(
        0, n_sub, sub_body, sub_init)

    # The first forward counts as a step of the block for every active row.
    steps_blk = jnp.where(row_active, jnp.maximum(steps_blk, 1), 0)
    canvas = jnp.where(row_active[:, None], _row_update(canvas, x, blk_start), canvas)
    steps = jnp.where(row_active[:, None] & (jnp.arange(n_blocks) == cur[:, None]),
                      steps_blk[:, None], steps)
    if on_block is not None:
      jax.debug.callback(on_block, cur, x, row_active, ordered=True)
    # A row ends at its last slot or once nothing is left to fill after this block.
    later = slot_pos >= ((cur + 1) * bk)[:, None]
    ended = ((cur + 1) * bk >= length) | ~jnp.any(maskable & exists & later, axis=-1)
    if opt.stop_at_eos:
      ended = ended | jnp.any((x == opt.eos_id) & blk_mask & blk_exists, axis=-1)
    done = done | ended
    return (j + 1, canvas, k_c, v_c, valid, done, steps, nfe, fwd, ue, edits_tot, rng)

  def block_cond(carry):
    return (carry[0] < n_blocks) & jnp.any(~carry[5])

  done0 = start_block * bk >= length
  init = (jnp.int32(0), tokens, k_cache, v_cache, seg_valid, done0,
          jnp.zeros((b, n_blocks), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.int32(0),
          jnp.float32(0.0), jnp.zeros((b,), jnp.int32), rng)
  out = jax.lax.while_loop(block_cond, block_body, init)
  (_, canvas, _, _, _, _, steps, nfe, fwd, ue, edits_tot, _) = out
  return {"tokens": canvas, "steps": steps, "nfe": nfe, "forwards": fwd, "edits": edits_tot,
          "unique_experts": ue / jnp.maximum(fwd, 1).astype(jnp.float32)}
