"""Autoregressive decoding of a block-diffusion model: one token per forward, KV cache.

How a block-diffusion model decodes AR: every new position q is its own one-token noisy
block. Block ids are metadata, not a function the model fixes, so the prompt keeps its
trained block ids (``position // block_size``, block-causal clean attention) and each
generated position q gets block id q, which is larger than every prompt block id. Then
the mask does the rest: the MASK at q (NOISY, block q) sees every clean token before it,
and the clean copy of a generated token (block q) sees the prompt and the generated
tokens up to itself -- causal attention. Each forward holds two tokens,
``[token q-1 as CLEAN ; MASK at q as NOISY]``: it commits q-1's K/V to the cache and
predicts q in the same pass, so NFE = generated tokens (the prefill forward predicts the
first one and is counted; nothing else is).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax.model import masks
from blockdiff_jax.sampling import decoder

Array = Any
_NEG = -1e30


def decode_ar(model, params, canvas: decoder.Canvas, options: decoder.DecodeOptions,
              rng: Array | None = None) -> dict:
  """Greedy/sampled AR continuation of a generation canvas (``layout.generation_canvas``).

  Only plain continuation is supported: each row's maskable slots must be the
  contiguous run after its prompt.

  Returns:
    dict with ``tokens`` [B, S], ``nfe`` [B] (forwards while the row was active, the
    prefill included since it predicts the first token) and ``forwards``.
  """
  tokens = np.asarray(canvas.tokens)
  prompt_len = np.argmax(canvas.maskable, axis=1).astype(np.int32)
  for i in range(tokens.shape[0]):
    run = canvas.maskable[i, prompt_len[i]:canvas.length[i]]
    if not run.all() or canvas.maskable[i, canvas.length[i]:].any() or not run.size:
      raise ValueError(f"row {i}: AR decoding needs one contiguous span after the prompt")
  key = (model, options, int(prompt_len.max()))
  if key not in _CACHE:
    _CACHE[key] = jax.jit(lambda *a: _decode_ar(model, options, int(prompt_len.max()), *a))
  rng = jax.random.key(0) if rng is None else rng
  out = _CACHE[key](params, jnp.asarray(tokens), jnp.asarray(prompt_len),
                    jnp.asarray(canvas.length, jnp.int32), rng)
  out = jax.device_get(out)
  out["prefill_passes"] = 1
  out["commit_passes"] = 0
  return out


_CACHE: dict = {}


def _block_ids(pos, prompt_len, block_size):
  return jnp.where(pos < prompt_len[:, None], pos // block_size, pos)


def _decode_ar(model, opt: decoder.DecodeOptions, pmax: int, params, tokens, prompt_len,
               length, rng):
  cfg = model.cfg
  b, s = tokens.shape
  bk = opt.block_size
  dtype = cfg.compute_dtype
  slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

  def meta(pos, stream, valid):
    m = masks.make_meta(pos, bk, stream, jnp.where(valid, 0, -1))
    return dataclasses.replace(m, block_ids=_block_ids(pos, prompt_len, bk))

  def pick(logits, key):
    logits = logits.at[..., opt.mask_id].set(_NEG)
    toks, _, _ = opt.sampling.propose(logits, key)
    return toks

  # Prefill: the prompt (clean) and the MASK of the first new position (noisy).
  ppos = slot[:, :pmax]
  qpos = prompt_len[:, None]
  m = meta(ppos, masks.CLEAN, ppos < prompt_len[:, None]).concat(
      meta(qpos, masks.NOISY, jnp.ones((b, 1), bool)))
  inp = jnp.concatenate([tokens[:, :pmax], jnp.full((b, 1), opt.mask_id, jnp.int32)], 1)
  logits, aux = model.apply({"params": params}, inp, m, return_kv=True,
                            logits_slice=(pmax, 1))
  kv_shape = (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
  k_c = jnp.zeros(kv_shape, dtype).at[:, :, :pmax].set(aux["kv"][0][:, :, :pmax].astype(dtype))
  v_c = jnp.zeros(kv_shape, dtype).at[:, :, :pmax].set(aux["kv"][1][:, :, :pmax].astype(dtype))
  valid = slot < prompt_len[:, None]
  first = pick(logits[:, 0], jax.random.fold_in(rng, 0))
  tokens = jax.vmap(lambda row, t, q: row.at[q].set(t))(tokens, first, prompt_len)
  done = (first == opt.eos_id) if opt.stop_at_eos else jnp.zeros((b,), bool)
  done = done | (prompt_len + 1 >= length)
  nfe = jnp.ones((b,), jnp.int32)

  def cond(c):
    return jnp.any(~c[5])

  def body(c):
    q, tokens, k_c, v_c, valid, done, nfe, fwd = c
    # Row-wise next position: prompt_len + q, i.e. q tokens generated so far.
    pos = jnp.minimum(prompt_len + q, length - 1)  # Finished rows idle in bounds.
    last = jnp.take_along_axis(tokens, (pos - 1)[:, None], axis=1)
    m = meta((pos - 1)[:, None], masks.CLEAN, jnp.ones((b, 1), bool)).concat(
        meta(pos[:, None], masks.NOISY, jnp.ones((b, 1), bool)))
    cache = {"k": k_c, "v": v_c, "meta": meta(slot, masks.CLEAN, valid)}
    inp = jnp.concatenate([last, jnp.full((b, 1), opt.mask_id, jnp.int32)], axis=1)
    logits, aux = model.apply({"params": params}, inp, m, cache=cache, return_kv=True,
                              logits_slice=(1, 1))
    write = lambda c_, u, o: jax.lax.dynamic_update_slice_in_dim(c_, u, o, axis=1)
    k_c = jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)(
        k_c, aux["kv"][0][:, :, :1].astype(dtype), pos - 1)
    v_c = jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)(
        v_c, aux["kv"][1][:, :, :1].astype(dtype), pos - 1)
    valid = valid | (slot == (pos - 1)[:, None])
    tok = pick(logits[:, 0], jax.random.fold_in(rng, q))
    active = ~done
    new_tokens = jax.vmap(lambda row, t, p: row.at[p].set(t))(tokens, tok, pos)
    tokens = jnp.where(active[:, None], new_tokens, tokens)
    nfe = nfe + active.astype(jnp.int32)
    ended = pos + 1 >= length
    if opt.stop_at_eos:
      ended = ended | (tok == opt.eos_id)
    done = done | (active & ended)
    return q + 1, tokens, k_c, v_c, valid, done, nfe, fwd + 1

  init = (jnp.int32(1), tokens, k_c, v_c, valid, done, nfe, jnp.int32(1))
  _, tokens, _, _, _, _, nfe, fwd = jax.lax.while_loop(cond, body, init)
  return {"tokens": tokens, "nfe": nfe, "forwards": fwd}
