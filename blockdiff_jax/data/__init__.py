"""data package of blockdiff_jax."""
