"""blockdiff_jax: Mixture-of-Experts block-diffusion language models in JAX/Flax."""

__version__ = "0.1.0"
