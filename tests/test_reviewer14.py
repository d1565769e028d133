"""reviewer14: a summary-token model given one metadata row for the whole batch (as MoE
and XLA attention accept) computes what it computes with the row repeated, with LoRA on
its slots and on the structured attention path too.

Reference: the same model on the [B, T] metadata.
"""

import jax
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import lora
from blockdiff_jax.model import summary
from blockdiff_jax.model import transformer

L, BS = 8, 4


@pytest.mark.parametrize("impl,gated", [("xla", True), ("xla", False), ("structured", None)])
def test_one_metadata_row_for_the_batch(impl, gated):
  lo = None if gated is None else lora.LoraConfig(rank=2, mask_id=5, gated=gated)
  cfg = transformer.TransformerConfig(
      vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
      mlp_dim=16, summary=summary.SummaryConfig(num_slots=2, window_blocks=1, block_size=BS),
      lora=lo, attention_impl=impl)
  model = transformer.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 2 * L), 0, 16).at[:, :3].set(5)
  rows = masks.training_meta(L, BS, 2)
  params = model.init(jax.random.key(0), tokens, rows, summary="bd3")
  if lo is not None:  # Adapters that act: B is zero at init.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
                      if "lora_b" in str(p) else x), params)
  want = model.apply(params, tokens, rows, summary="bd3")[0]
  # Before: a concatenate shape error (LoRA), a ValueError (structured).
  got = model.apply(params, tokens, masks.training_meta(L, BS, 1), summary="bd3")[0]
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  assert not np.allclose(want[0], want[1])  # Rows differ: no broadcast of one answer.
