"""Grouped matmul (MoE expert dispatch) as Pallas kernels."""

from pallas_kernels.gmm.kernel import GmmBlockSizes
from pallas_kernels.gmm.kernel import make_schedule
from pallas_kernels.gmm.ops import gmm
from pallas_kernels.gmm.ops import tgmm
from pallas_kernels.gmm.reference import gmm_reference
from pallas_kernels.gmm.reference import tgmm_reference

__all__ = ["GmmBlockSizes", "gmm", "tgmm", "gmm_reference", "tgmm_reference",
           "make_schedule"]
