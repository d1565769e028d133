"""Forward (masking) process of absorbing-state block diffusion."""

from typing import Any

import jax
import jax.numpy as jnp

Array = Any


def block_values(per_block: Array, length: int, block_size: int) -> Array:
  """Broadcasts per-block values [B, nb] to tokens [B, length]."""
  if per_block.shape[1] * block_size < length:
    # The repeat came back short: the masking rates then failed to broadcast against
    # the tokens far from here, in an error naming neither the blocks nor the length.
    raise ValueError(f"block_values: {per_block.shape[1]} blocks of {block_size} tokens do "
                     f"not cover length {length}")
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
    (x_t, is_masked) with is_masked a bool [B, L]; x_t is int32 where ``x0``'s dtype
    cannot hold ``mask_id``.
  """
  x0 = jnp.asarray(x0)
  if not jnp.issubdtype(x0.dtype, jnp.integer):
    raise ValueError(f"mask_tokens: tokens must be integer ids, got dtype {x0.dtype}")
  if not jnp.iinfo(x0.dtype).min <= mask_id <= jnp.iinfo(x0.dtype).max:
    # Token files are often uint16 (the pipeline's own stream is); a MASK id past the
    # dtype's range (65536 = a 2^16 vocabulary's appended MASK) wrapped around silently
    # in jnp.where and the "masked" tokens became real ones (token 0).
    x0 = x0.astype(jnp.int32)
  is_masked = jax.random.uniform(rng, x0.shape) < mask_prob
  if maskable is not None:
    is_masked = is_masked & maskable
  return jnp.where(is_masked, mask_id, x0), is_masked
