"""Train-step FLOP counts of the token-shifted objectives, against the BD3-LM count."""

import pytest

from blockdiff_jax.model import flops
from blockdiff_jax.model import transformer


def _cfg(vocab=64, d=32):
  return transformer.TransformerConfig(vocab_size=vocab, d_model=d, num_layers=2, num_heads=4,
                                       num_kv_heads=2, head_dim=8, mlp_dim=48)


@pytest.mark.parametrize("batch,seq_len", [(1, 16), (4, 64)])
def test_fastdllm_counts_both_copies_and_the_head_on_both_streams(batch, seq_len):
  cfg = _cfg()
  one_copy = flops.fastdllm_step_flops(cfg, batch, seq_len, complementary=False,
                                       frozen_base=False)
  # BD3-LM runs the head on the L noisy positions only; the shift reads all 2L.
  head_on_l = 3.0 * batch * 2.0 * cfg.vocab_size * cfg.d_model * seq_len
  assert one_copy == pytest.approx(flops.train_step_flops(cfg, batch, seq_len) + head_on_l)
  both = flops.fastdllm_step_flops(cfg, batch, seq_len, complementary=True, frozen_base=False)
  assert both == pytest.approx(2 * one_copy)
  frozen = flops.fastdllm_step_flops(cfg, batch, seq_len, complementary=True, frozen_base=True)
  assert frozen == pytest.approx(both * 2 / 3)


@pytest.mark.parametrize("batch,seq_len", [(1, 16), (4, 64)])
def test_ar_step_is_one_causal_pass_of_l_tokens(batch, seq_len):
  cfg = _cfg()
  forward = flops.forward_flops_per_token(cfg, seq_len, with_head=True) * seq_len
  assert flops.autoregressive_step_flops(cfg, batch, seq_len, False) == pytest.approx(
      3 * batch * forward)
  assert flops.autoregressive_step_flops(cfg, batch, seq_len, True) == pytest.approx(
      2 * batch * forward)


@pytest.mark.parametrize("batch,seq_len", [(1, 16), (4, 64)])
def test_bd3_step_with_a_frozen_base_is_two_forwards_not_three(batch, seq_len):
  """LoRA freezes the base through stop_gradient: no weight gradients are formed."""
  cfg = _cfg()
  full = flops.train_step_flops(cfg, batch, seq_len)
  assert flops.train_step_flops(cfg, batch, seq_len, frozen_base=True) == pytest.approx(
      full * 2 / 3)
