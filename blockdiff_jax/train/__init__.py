"""train package of blockdiff_jax."""
