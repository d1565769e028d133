"""Train-step FLOP counts of the token-shifted objectives, against the BD3-LM count."""

import pytest

from blockdiff_jax.model import flops
from blockdiff_jax.model import transformer
from conftest import xla_and_counted_step_flops


def _cfg(vocab=64, d=32):
  return transformer.TransformerConfig(vocab_size=vocab, d_model=d, num_layers=2, num_heads=4,
                                       num_kv_heads=2, head_dim=8, mlp_dim=48)


# _cfg's matmul weights by hand: q, k, v = 32 x (4 + 2 + 2) x 8, out = 32 x 32, SwiGLU
# 3 x 32 x 48, two layers; the head 64 x 32.
TRUNK_WEIGHTS, HEAD_WEIGHTS = 2 * (32 * 8 * 8 + 32 * 32 + 3 * 32 * 48), 64 * 32


def _weight_gradients(rows, trunk_positions, head_positions):
  """FLOPs a frozen base does not compute: the weight gradients, one per forward matmul
  of a weight (the attention scores multiply two activations: their backward runs
  either way), and the first layer's q, k, v input gradient (its input, the frozen
  embedding's output, needs none)."""
  first_qkv = 32 * 8 * 8
  return rows * 2.0 * (trunk_positions * (TRUNK_WEIGHTS + first_qkv)
                       + head_positions * HEAD_WEIGHTS)


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
  assert both - frozen == pytest.approx(_weight_gradients(2 * batch, 2 * seq_len, 2 * seq_len))


@pytest.mark.parametrize("batch,seq_len", [(1, 16), (4, 64)])
def test_ar_step_is_one_causal_pass_of_l_tokens(batch, seq_len):
  cfg = _cfg()
  forward = flops.forward_flops_per_token(cfg, seq_len, with_head=True) * seq_len
  assert flops.autoregressive_step_flops(cfg, batch, seq_len, False) == pytest.approx(
      3 * batch * forward)
  assert flops.autoregressive_step_flops(cfg, batch, seq_len, True) == pytest.approx(
      3 * batch * forward - _weight_gradients(batch, seq_len, seq_len))


@pytest.mark.parametrize("batch,seq_len", [(1, 16), (4, 64)])
def test_bd3_step_with_a_frozen_base_forms_no_weight_gradients(batch, seq_len):
  """LoRA freezes the base through stop_gradient: no weight gradients are formed (the
  trunk runs [x_t ; x_0], 2L positions, the head the L noisy ones)."""
  cfg = _cfg()
  full = flops.train_step_flops(cfg, batch, seq_len)
  assert full - flops.train_step_flops(cfg, batch, seq_len, frozen_base=True) == (
      pytest.approx(_weight_gradients(batch, 2 * seq_len, seq_len)))


@pytest.mark.parametrize("objective", ["bd3", "fastdllm", "ar", "introspective"])
def test_objective_step_flops_is_close_to_xlas_count(objective):
  """Against XLA's own count of the compiled train step, on an attention-heavy shape
  (L=256, d=64) where a miscounted attention pass shows: ours leaves out element-wise
  work and the optimizer, so it sits a little below XLA's, never far."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.vocab_size, c.model.d_model, c.model.num_layers = 64, 64, 2
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim, c.model.mlp_dim = 4, 4, 16, 256
  c.model.moe.num_experts = 0
  c.data.batch_size, c.data.seq_len = 1, 256
  c.diffusion.objective, c.diffusion.token_shift = objective, objective != "bd3"
  if objective == "introspective":  # No anchors: one dense [noisy ; x_0] pass.
    c.diffusion.block_size = c.diffusion.isd_stride
  xla, ours = xla_and_counted_step_flops(c)
  ratio = ours / xla
  assert 0.85 < ratio < 1.02, ratio
