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
  # With no prompt the first "next token" would be read off a padding position: a token
  # the model never predicted, returned as if it had.
  if not prompt:
    raise ValueError("greedy: prompt is empty; give at least one token")
  if steps < 0:
    raise ValueError(f"greedy: steps must be >= 0, got {steps}")
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
  ids = np.asarray(ids, np.int32)
  # One token has no next token to score: the mean over none was a silent NaN.
  if ids.ndim != 1 or ids.size < 2:
    raise ValueError(f"perplexity: ids must be one sequence of >= 2 tokens, got shape "
                     f"{ids.shape}")
  ids = ids[None]
  lp = jax.nn.log_softmax(jnp.asarray(logits(cfg, params, ids)[0, :-1]), axis=-1)
  nll = -jnp.take_along_axis(lp, jnp.asarray(ids[0, 1:, None]), axis=-1)
  return float(math.exp(float(jnp.mean(nll))))
