"""model package of blockdiff_jax."""
