"""Plain-XLA references of the grouped matmuls."""

from typing import Any

import jax
import jax.numpy as jnp

Array = Any


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array,
                  preferred_element_type: Any = None) -> Array:
  """``jax.lax.ragged_dot``: the XLA grouped matmul with the same semantics.

  Negative sizes count as empty groups, as in the kernel (ragged_dot leaves them undefined);
  ``group_sizes`` may be a list or tuple of ints, as for ``gmm``.
  """
  return jax.lax.ragged_dot(lhs, rhs, jnp.maximum(jnp.asarray(group_sizes, jnp.int32), 0),
                            preferred_element_type=preferred_element_type)


def tgmm_reference(lhs: Array, dout: Array, group_sizes: Array,
                   preferred_element_type: Any = None) -> Array:
  """[G, K, N] per-group ``lhs_g^T @ dout_g`` via a one-hot group mask (O(G·M·K·N)).

  ``group_sizes``: [G] integer rows per group, array or list/tuple (as for ``tgmm``).
  """
  m = lhs.shape[0]
  sizes = jnp.maximum(jnp.asarray(group_sizes, jnp.int32), 0)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  rows = jnp.arange(m)
  onehot = ((rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None]))
  out = jnp.einsum("gm,mk,mn->gkn", onehot.astype(lhs.dtype), lhs, dout,
                   preferred_element_type=jnp.float32)
  return out.astype(preferred_element_type or lhs.dtype)
