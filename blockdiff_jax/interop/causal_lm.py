"""Our transformer used as a plain causal LM (left-padded batches): logits and perplexity.

This is how an imported model is checked against its source: the block-diffusion mask
with block size 1 and only clean tokens is ordinary causal attention.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import transformer


def causal_meta(valid: Any) -> masks.TokenMeta:
  """Metadata of a (left- or right-) padded batch: valid [B, T] bool; pads never seen."""
  valid = jnp.asarray(valid, bool)
  positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
  return masks.make_meta(positions, 1, masks.CLEAN,
                         segment_ids=jnp.where(valid, 0, -1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens, valid):
  out, _ = transformer.Transformer(cfg).apply({"params": params}, tokens, causal_meta(valid))
  return out


def logits(cfg: transformer.TransformerConfig, params: Any, tokens: Any,
           valid: Any = None) -> np.ndarray:
  """fp32 next-token logits [B, T, V] of tokens [B, T] (valid [B, T]: False at pads)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  if valid is None:
    valid = jnp.ones(tokens.shape, bool)
  return np.asarray(_logits(cfg, params, tokens, jnp.asarray(valid, bool)))


def greedy(cfg: transformer.TransformerConfig, params: Any, prompt: Any, steps: int) -> list[int]:
  """Greedy continuation by full forwards over a fixed-width buffer (one compile).

  The slow reference decoder: every step re-runs the whole sequence.
  """
  prompt = [int(t) for t in prompt]
  width = len(prompt) + steps
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(prompt)] = prompt
  valid = np.zeros((1, width), bool)
  out = []
  for i in range(steps):
    n = len(prompt) + i
    valid[0, :n] = True
    nxt = int(np.argmax(logits(cfg, params, tokens, valid)[0, n - 1]))
    tokens[0, n] = nxt
    out.append(nxt)
  return out


def perplexity(cfg: transformer.TransformerConfig, params: Any, ids: Any) -> float:
  """exp(mean NLL) of ids[1:] given their prefixes (one sequence)."""
  ids = np.asarray(ids, np.int32)[None]
  lp = jax.nn.log_softmax(jnp.asarray(logits(cfg, params, ids)[0, :-1]), axis=-1)
  nll = -jnp.take_along_axis(lp, jnp.asarray(ids[0, 1:, None]), axis=-1)
  return float(math.exp(float(jnp.mean(nll))))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy_cached(cfg, params, tokens, steps, valid):
  """Prefill, then one token per forward against a fixed-size KV buffer."""
  model = transformer.Transformer(cfg)
  b, p = tokens.shape
  s = p + steps
  meta = causal_meta(valid)
  logits_p, aux = model.apply({"params": params}, tokens, meta, return_kv=True,
                              logits_slice=(p - 1, 1))
  k, v = aux["kv"]
  pad = [(0, 0), (0, 0), (0, steps), (0, 0), (0, 0)]
  k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  empty = masks.make_meta(jnp.zeros((b, steps), jnp.int32), 1, masks.CLEAN,
                          segment_ids=jnp.full((b, steps), -1, jnp.int32))
  cache_meta = meta.concat(empty)
  next_pos = meta.positions[:, -1] + 1
  first = jnp.argmax(logits_p[:, -1], axis=-1).astype(jnp.int32)

  def step(i, carry):
    k, v, cache_meta, tok, out = carry
    out = out.at[:, i].set(tok)
    pos = (next_pos + i)[:, None]
    m = masks.make_meta(pos, 1, masks.CLEAN)
    lg, aux = model.apply({"params": params}, tok[:, None], m,
                          cache={"k": k, "v": v, "meta": cache_meta}, return_kv=True)
    nk, nv = aux["kv"]
    k = jax.lax.dynamic_update_slice_in_dim(k, nk.astype(k.dtype), p + i, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(v, nv.astype(v.dtype), p + i, axis=2)
    cache_meta = jax.tree.map(
        lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), p + i, axis=1),
        cache_meta, m)
    return k, v, cache_meta, jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32), out

  out = jnp.zeros((b, steps), jnp.int32)
  *_, out = jax.lax.fori_loop(0, steps, step, (k, v, cache_meta, first, out))
  del s
  return out


def greedy_cached(cfg: transformer.TransformerConfig, params: Any, tokens: Any, steps: int,
                  valid: Any = None) -> np.ndarray:
  """Greedy continuation of a left-padded batch with a KV cache, all in one jit call.

  Args:
    cfg, params: the model.
    tokens: int [B, P] prompts, left-padded.
    steps: new tokens per row.
    valid: bool [B, P], False at pads (default: all valid).

  Returns:
    int32 [B, steps] generated ids.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
  return np.asarray(_greedy_cached(cfg, params, tokens, steps, valid))
