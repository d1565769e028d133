"""Reference of block attention: the model's XLA path, shared so both agree."""

from blockdiff_jax.model.attention_ops import masked_attention

__all__ = ["masked_attention"]
