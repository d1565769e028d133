"""Compatibility name of ``blockdiff_jax.masks`` for the sampling package.

The mask functions moved below the model and the kernels (``blockdiff_jax/masks.py``)
so that ``pallas_kernels`` does not import the model. New code imports
``blockdiff_jax.masks``.
"""

# pylint: disable=unused-import
from blockdiff_jax.masks import CLEAN
from blockdiff_jax.masks import dense_mask
from blockdiff_jax.masks import make_meta
from blockdiff_jax.masks import mask_fn
from blockdiff_jax.masks import MaskSpec
from blockdiff_jax.masks import NOISY
from blockdiff_jax.masks import TokenMeta
from blockdiff_jax.masks import training_meta
