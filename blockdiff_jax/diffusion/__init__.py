"""diffusion package of blockdiff_jax."""
