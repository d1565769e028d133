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
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks

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


def structured_attention(q: Array, k: Array, v: Array, meta: masks.TokenMeta,
                         layout: masks.SummaryLayout, spec: masks.MaskSpec,
                         scale: float | None = None) -> Array:
  """Self-attention over a full-sequence summary layout, block by block.

  Equal to ``attention_ops.masked_attention(q, k, v, meta, meta, spec)`` when
  ``meta`` follows ``layout`` (block-aligned streams, then their slots), at a cost
  of n·√n instead of n².

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
  b, total, h, d = q.shape
  hk = k.shape[2]
  if h % hk:
    raise ValueError(f"heads={h} is not a multiple of kv_heads={hk}")
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
  return jnp.concatenate([out_main, out_slots], axis=1).astype(q.dtype)
