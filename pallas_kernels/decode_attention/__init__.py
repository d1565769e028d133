"""Split-K decode attention (flash-decoding): a short query block against a long KV cache."""

from pallas_kernels.decode_attention.kernel import DecodeBlockSizes
from pallas_kernels.decode_attention.ops import decode_attention
from pallas_kernels.decode_attention.ops import split_plan
from pallas_kernels.decode_attention.reference import decode_attention as reference_attention

__all__ = ["DecodeBlockSizes", "decode_attention", "reference_attention",
           "split_plan"]
