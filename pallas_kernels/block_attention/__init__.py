"""Flash attention with a block-diffusion mask derived from token metadata."""

from pallas_kernels.block_attention.kernel import AttentionBlockSizes
from pallas_kernels.block_attention.ops import block_attention
from pallas_kernels.block_attention.reference import masked_attention

__all__ = ["AttentionBlockSizes", "block_attention", "masked_attention"]
