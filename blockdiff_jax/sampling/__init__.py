"""sampling package of blockdiff_jax."""
