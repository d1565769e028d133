"""Forward (masking) process of absorbing-state block diffusion."""

from typing import Any

import jax
import jax.numpy as jnp

Array = Any


def block_values(per_block: Array, length: int, block_size: int) -> Array:
  """Broadcasts per-block values [B, nb] to tokens [B, length]."""
  return jnp.repeat(per_block, block_size, axis=1)[:, :length]


def mask_tokens(rng: Array, x0: Array, mask_prob: Array, mask_id: int,
                maskable: Array | None = None) -> tuple[Array, Array]:
  """Replaces each maskable token by ``mask_id`` with its own probability.

  Args:
    rng: PRNG key.
    x0: clean tokens [B, L].
    mask_prob: per-token masking probability [B, L].
    mask_id: the MASK token id.
    maskable: [B, L] bool; False keeps a token clean (prompt, padding).

  Returns:
    (x_t, is_masked) with is_masked a bool [B, L].
  """
  is_masked = jax.random.uniform(rng, x0.shape) < mask_prob
  if maskable is not None:
    is_masked = is_masked & maskable
  return jnp.where(is_masked, mask_id, x0), is_masked
