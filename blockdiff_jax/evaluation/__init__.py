"""evaluation package of blockdiff_jax."""
