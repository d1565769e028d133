"""Structured attention for the summary-token layout: no T×T array anywhere.

With ChatDLM summary slots (``masks.SummaryLayout``) and a window of W blocks, a
query of block c can see only: its own block in its own stream, the W clean blocks
before it, and the summary slots of older blocks; a slot sees its clean block and
its sibling slots. So each query block is scored against a fixed key set — its own
block, a window of W clean blocks and the whole summary bank (G·S slots for G
blocks) — instead of all T keys, and the element mask inside that set is still
``masks.mask_fn`` of the gathered metadata (so padding, packed segments and the
window edge at block 0 come out exactly as in the dense reference).

Cost for a stream of n = G·B tokens: n·((W+1)·B + G·S) logits, i.e.
n·((W+1)·B + n·S/B); with B ≈ √n both terms grow like n·√n (memory too).
"""

import dataclasses
from typing import Any

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops

Array = Any


def _fields(meta: masks.TokenMeta, fn) -> masks.TokenMeta:
  return masks.TokenMeta(*(fn(x) for x in dataclasses.astuple(meta)))


def _softmax_rows(logits: Array, mask: Array) -> Array:
  """Masked softmax along the last axis in fp32; rows that see nothing give zeros."""
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def _rows_follow_layout(meta: masks.TokenMeta, streams: int, blocks: int, block: int,
                        slots: int) -> Array:
  """[batch] bool: rows whose metadata matches the index grouping the block views use.

  The views read token ``c*B + i`` of every stream as block c and slot ``c*S + j`` as
  block c's, so a row is exact only when each group of B tokens shares one block id,
  ids increase from group to group (then the W groups before a query hold every clean
  block its window admits), every stream and the slots agree on the ids, and the
  stream / summary flags follow the layout. Positions may be anything.
  """
  b = meta.block_ids.shape[0]
  n_main = streams * blocks * block
  ids = meta.block_ids[:, :n_main].reshape(b, streams, blocks, block)
  first = ids[..., 0]  # [b, streams, blocks]
  ok = jnp.all(ids == first[..., None], axis=(1, 2, 3))
  ok &= jnp.all(first == first[:, -1:], axis=(1, 2))
  ok &= jnp.all(first[..., 1:] > first[..., :-1], axis=(1, 2))
  slot_ids = meta.block_ids[:, n_main:].reshape(b, blocks, slots)
  ok &= jnp.all(slot_ids == first[:, -1, :, None], axis=(1, 2))
  want_stream = np.array([masks.NOISY] * (streams - 1) + [masks.CLEAN])[:, None]
  ok &= jnp.all(meta.stream[:, :n_main].reshape(b, streams, -1) == want_stream, axis=(1, 2))
  ok &= jnp.all(meta.stream[:, n_main:] == masks.CLEAN, axis=1)
  ok &= ~jnp.any(meta.is_summary[:, :n_main], axis=1)
  return ok & jnp.all(meta.is_summary[:, n_main:], axis=1)


def _describe_misalignment(meta: masks.TokenMeta, row: int, streams: int, blocks: int,
                           block: int, slots: int) -> str:
  """What in ``row`` of concrete metadata breaks the layout (for the error message)."""
  ids = np.asarray(meta.block_ids[row])
  n_main = streams * blocks * block
  groups = ids[:n_main].reshape(streams, blocks, block)
  for s in range(streams):
    for c in range(blocks):
      if (groups[s, c] != groups[s, c, 0]).any():
        at = s * blocks * block + c * block
        return (f"stream {s}, tokens {c * block}..{c * block + block - 1} have block_ids "
                f"{groups[s, c].tolist()} (positions from "
                f"{int(np.asarray(meta.positions[row])[at])}): a stream must start at a "
                "block boundary and hold whole blocks")
  first = groups[..., 0]
  if (first != first[-1]).any() or (np.diff(first, axis=-1) <= 0).any():
    return f"per-block block_ids {first.tolist()} are not increasing and equal across streams"
  slot_ids = ids[n_main:].reshape(blocks, slots)
  if (slot_ids != first[-1][:, None]).any():
    return f"slot block_ids {slot_ids.tolist()} differ from their blocks' {first[-1].tolist()}"
  return ("stream / is_summary flags do not follow the layout (streams "
          f"{np.asarray(meta.stream[row]).tolist()}, is_summary "
          f"{np.asarray(meta.is_summary[row]).astype(int).tolist()})")


def structured_attention(q: Array, k: Array, v: Array, meta: masks.TokenMeta,
                         layout: masks.SummaryLayout, spec: masks.MaskSpec,
                         scale: float | None = None) -> Array:
  """Self-attention over a full-sequence summary layout, block by block.

  Equal to ``attention_ops.masked_attention(q, k, v, meta, meta, spec)`` when
  ``meta`` follows ``layout`` (block-aligned streams, then their slots), at a cost
  of n·√n instead of n². A row whose metadata does not (a stream starting inside a
  block, block ids that are not one per group of B tokens) would silently miss keys
  its mask admits: concrete metadata raises a ValueError naming the values. Under
  tracing, where values cannot be checked, such a row's output is NaN, and under
  ``checkify.checkify(fn, errors=checkify.user_checks)`` the returned error names the
  row (a ``checkify.debug_check``: without checkify it compiles to nothing, so the
  training step pays no predicate read-back and no host callback per layer).

  Args:
    q: [batch, T, heads, head_dim] with T = streams·L + (L/B)·S.
    k: [batch, T, kv_heads, head_dim].
    v: [batch, T, kv_heads, head_dim].
    meta: metadata of the T positions.
    layout: the static layout.
    spec: mask options (``window_blocks`` = W >= 1).
    scale: logit scale; defaults to head_dim ** -0.5.

  Returns:
    [batch, T, heads, head_dim] in q's dtype.
  """
  # Self-attention: keys are the queries' own positions, with the same metadata.
  attention_ops.validate_qkv("structured_attention", q, k, v, None, None)
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"structured_attention: k {k.shape} and q {q.shape} differ in length "
                     "(self-attention over one layout)")
  # The layout views reshape the metadata rows: no broadcasting here.
  shapes = [jnp.shape(x) for x in dataclasses.astuple(meta)]
  if any(shape != q.shape[:2] for shape in shapes):
    raise ValueError(f"structured_attention: meta field shapes {shapes} != {q.shape[:2]}")
  b, total, h, d = q.shape
  hk = k.shape[2]
  if spec.window_blocks < 1:
    raise ValueError("structured_attention needs MaskSpec.window_blocks >= 1, got "
                     f"{spec.window_blocks}")
  groups = h // hk
  scale = d ** -0.5 if scale is None else scale
  ns, bs, ss, w = layout.streams, layout.block_size, layout.num_slots, spec.window_blocks
  length = layout.stream_length(total)
  nb = length // bs
  n_main = ns * length

  # Views: [batch, stream, block, token-in-block, ...] and [batch, block, slot, ...].
  aligned = _rows_follow_layout(meta, ns, nb, bs, ss)
  if not isinstance(aligned, jax.core.Tracer) and not np.all(aligned):
    row = int(np.argmin(np.asarray(aligned)))
    raise ValueError("structured_attention: metadata row "
                     f"{row} does not follow the summary layout (streams={ns}, block_size="
                     f"{bs}, num_slots={ss}): "
                     + _describe_misalignment(meta, row, ns, nb, bs, ss))
  checkify.debug_check(
      jnp.all(aligned), "structured_attention: metadata row {row} does not follow the "
      f"summary layout (streams={ns}, block_size={bs}, num_slots={ss})",
      row=jnp.argmin(aligned))

  main = lambda x: x[:, :n_main].reshape((b, ns, nb, bs) + x.shape[2:])
  slots = lambda x: x[:, n_main:].reshape((b, nb, ss) + x.shape[2:])
  qm = _fields(meta, main)
  sm = _fields(meta, slots)
  # Window: block c reads clean blocks c-W..c-1; indices below 0 are clamped and
  # masked out (a clamped block would otherwise be counted twice).
  win_idx = np.arange(nb)[:, None] + np.arange(-w, 0)[None, :]  # [nb, W]
  win_ok = jnp.asarray(np.repeat(win_idx >= 0, bs, axis=1))  # [nb, W*B]
  win_idx = np.clip(win_idx, 0, None)
  window = lambda x: x[:, win_idx].reshape((b, nb, w * bs) + x.shape[3:])
  clean_main = lambda x: x[:, -1]  # the clean stream: [b, nb, bs, ...]

  qg = main(q).reshape(b, ns, nb, bs, hk, groups, d)
  k_own, v_own = main(k), main(v)  # [b, ns, nb, bs, hk, d]
  k_win, v_win = window(clean_main(main(k))), window(clean_main(main(v)))  # [b, nb, W*B, ...]
  k_bank = k[:, n_main:]  # [b, nb*S, hk, d]
  v_bank = v[:, n_main:]

  # Token queries: logits against [own block | window | bank].
  f32 = dict(preferred_element_type=jnp.float32)
  s_own = jnp.einsum("bscqhgd,bsckhd->bshgcqk", qg, k_own, **f32)
  s_win = jnp.einsum("bscqhgd,bckhd->bshgcqk", qg, k_win, **f32)
  s_bank = jnp.einsum("bscqhgd,bkhd->bshgcqk", qg, k_bank, **f32)
  logits = jnp.concatenate([s_own, s_win, s_bank], axis=-1) * scale

  qe = _fields(qm, lambda x: x[..., :, None])  # [b, ns, nb, bs, 1]
  own_meta = _fields(qm, lambda x: x[..., None, :])  # [b, ns, nb, 1, bs]
  win_meta = _fields(_fields(meta, lambda x: clean_main(main(x))),
                     lambda x: window(x)[:, None, :, None, :])  # [b, 1, nb, 1, W*B]
  bank_meta = _fields(meta, lambda x: x[:, None, None, None, n_main:])  # [b,1,1,1,nb*S]
  mask = jnp.concatenate([
      jnp.broadcast_to(masks.mask_fn(qe, own_meta, spec), (b, ns, nb, bs, bs)),
      jnp.broadcast_to(masks.mask_fn(qe, win_meta, spec) & win_ok[:, None, :],
                       (b, ns, nb, bs, w * bs)),
      jnp.broadcast_to(masks.mask_fn(qe, bank_meta, spec), (b, ns, nb, bs, nb * ss)),
  ], axis=-1)[:, :, None, None]  # [b, ns, 1, 1, nb, bs, K]
  p = _softmax_rows(logits, mask)
  p_own, p_win, p_bank = jnp.split(p, [bs, (w + 1) * bs], axis=-1)
  out = (jnp.einsum("bshgcqk,bsckhd->bscqhgd", p_own.astype(v.dtype), v_own, **f32)
         + jnp.einsum("bshgcqk,bckhd->bscqhgd", p_win.astype(v.dtype), v_win, **f32)
         + jnp.einsum("bshgcqk,bkhd->bscqhgd", p_bank.astype(v.dtype), v_bank, **f32))
  out_main = out.reshape(b, n_main, h, d)

  # Slot queries: logits against [their clean block | their sibling slots].
  qs = slots(q).reshape(b, nb, ss, hk, groups, d)
  k_blk, v_blk = clean_main(main(k)), clean_main(main(v))  # [b, nb, bs, hk, d]
  k_sib, v_sib = slots(k), slots(v)  # [b, nb, S, hk, d]
  s_logits = jnp.concatenate([
      jnp.einsum("bcqhgd,bckhd->bhgcqk", qs, k_blk, **f32),
      jnp.einsum("bcqhgd,bckhd->bhgcqk", qs, k_sib, **f32)], axis=-1) * scale
  sq = _fields(sm, lambda x: x[..., :, None])  # [b, nb, S, 1]
  blk_meta = _fields(_fields(meta, lambda x: clean_main(main(x))), lambda x: x[:, :, None, :])
  sib_meta = _fields(sm, lambda x: x[:, :, None, :])
  s_mask = jnp.concatenate([masks.mask_fn(sq, blk_meta, spec),
                            masks.mask_fn(sq, sib_meta, spec)], axis=-1)[:, None, None]
  ps = _softmax_rows(s_logits, s_mask)
  ps_blk, ps_sib = jnp.split(ps, [bs], axis=-1)
  out_s = (jnp.einsum("bhgcqk,bckhd->bcqhgd", ps_blk.astype(v.dtype), v_blk, **f32)
           + jnp.einsum("bhgcqk,bckhd->bcqhgd", ps_sib.astype(v.dtype), v_sib, **f32))
  out_slots = out_s.reshape(b, nb * ss, h, d)
  out = jnp.concatenate([out_main, out_slots], axis=1).astype(q.dtype)
  # Traced metadata cannot raise: a misaligned row comes out NaN rather than wrong.
  return jnp.where(aligned[:, None, None, None], out, jnp.nan)
