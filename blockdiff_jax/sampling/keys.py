"""Sampling keys of a decoder step: one key for the batch, or one key per row.

A decoder state's ``rng`` is either a scalar key (the batch decoders: a step's key is
folded with the batch's forward count) or a [B] array of keys, one per row (the serving
pool: a row's key is folded with its own forward count, so its draws depend only on its
seed and its own progress, never on its batch mates or on when it joined). The helpers
below take either and draw accordingly; ``normalize`` turns what a caller passed (typed
keys or raw ``jax.random.PRNGKey`` data) into one of the two.
"""

from typing import Any, Callable

import jax

Array = Any


def normalize(rng: Array | None, batch: int) -> Array:
  """The decoders' key: a scalar typed key or [batch] typed keys (default key 0).

  Raw key data (``jax.random.PRNGKey(s)``: uint32 [2], or [batch, 2] per row) is wrapped
  as typed keys: by its rank alone a raw scalar key looks like a [2] array of keys.

  Args:
    rng: None, a typed key array of shape () or [batch], or raw key data.
    batch: rows of the canvas.
  """
  if rng is None:
    return jax.random.key(0)
  dtype = getattr(rng, "dtype", None)
  if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    try:
      rng = jax.random.wrap_key_data(rng)
    except (TypeError, ValueError) as e:
      # JAX's own message names no argument; a seed passed as rng=42 lands here.
      raise ValueError(f"rng must be a key (jax.random.key(seed)), [batch] keys or raw "
                       f"PRNGKey data (uint32), got {rng!r:.80}: {e}") from e
  if rng.shape not in ((), (batch,)):
    raise ValueError(f"rng must be one key or one key per row ({batch} rows), got a key "
                     f"array of shape {rng.shape}")
  return rng


def seed_key(seed: int) -> Array:
  """A typed key of every bit of a 64-bit ``seed`` (an OpenAI request's, say).

  ``jax.random.key`` keeps only a seed's low 32 bits without x64: seeds 5 and 2**32 + 5
  drew the same samples. The high bits are folded in; a seed in [0, 2**32) keeps the
  key ``jax.random.key(seed)``.
  """
  seed = int(seed)
  low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
  key = jax.random.key(low)
  return jax.random.fold_in(key, high) if high else key


def step_key(rng: Array, batch_count: Array, row_count: Array) -> Array:
  """The key of a step: folded with ``batch_count`` (scalar key) or ``row_count`` [B]."""
  if rng.ndim == 0:
    return jax.random.fold_in(rng, batch_count)
  return jax.vmap(jax.random.fold_in)(rng, row_count)


def fold(key: Array, data: int) -> Array:
  """``fold_in`` of a scalar key or of every key of a [B] array."""
  if key.ndim == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def per_row(fn: Callable[..., Any], key: Array, *args: Array) -> Any:
  """``fn(key, *args)`` for a scalar key; for [B] keys, ``fn`` on each row alone.

  ``args`` have a leading batch axis; per row, ``fn`` sees them with a batch of one, so
  it runs the same code as for the whole batch.
  """
  if key.ndim == 0:
    return fn(key, *args)
  def one(k, *a):
    out = fn(k, *(x[None] for x in a))
    return jax.tree.map(lambda x: x[0], out)
  return jax.vmap(one)(key, *args)


def uniform(key: Array, shape: tuple[int, ...]) -> Array:
  """Uniform [0, 1) draws of ``shape`` (leading axis B) from one key or one per row."""
  if key.ndim == 0:
    return jax.random.uniform(key, shape)
  return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
