"""Train-step FLOPs with frozen weights (train.trainable), and validation over small splits."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.model import flops
from blockdiff_jax.model import moe
from blockdiff_jax.model import transformer
from blockdiff_jax.train import trainer
from conftest import xla_and_counted_step_flops


def _moe_cfg(**kw):
  """d=16, H=4 x 4, Hkv=2, E=4 experts of 8 (top 2), layer 0 dense (mlp 24), 1-2 MoE."""
  args = dict(vocab_size=32, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2,
              head_dim=4, mlp_dim=24, first_dense_layers=1,
              moe=moe.MoEConfig(num_experts=4, top_k=2, expert_dim=8))
  args.update(kw)
  return transformer.TransformerConfig(**args)


def _hand_moe_step(batch, seq_len):
  """``_moe_cfg``'s BD3-LM step with only routers and experts training, by hand.

  One pass of 2L positions reading 2L keys, the head on L. Weight gradients: the
  MoE layers' router (16x4) and active experts (2 x 3 x 16x8). Input gradients: none
  below layer 1's MoE (nothing under it trains); inside it only the expert output
  projection's (its input depends on the trained wi_gate / wi_up); layer 2 all of
  them, the attention scores' two; the head its input's only.
  """
  p, k, l = 2 * seq_len, 2 * seq_len, seq_len
  attn = 2 * p * (16 * 16 + 2 * 16 * 8 + 16 * 16)
  scores = 2 * 2 * p * k * 16
  dense = 2 * p * 3 * 16 * 24
  router, experts, wo = 2 * p * 16 * 4, 2 * p * 2 * 3 * 16 * 8, 2 * p * 2 * 8 * 16
  head = 2 * l * 32 * 16
  forward = 3 * (attn + scores) + dense + 2 * (router + experts) + head
  backward = (2 * (router + experts)  # weight gradients, layers 1 and 2
              + wo  # layer 1: the expert output projection's input gradient
              + attn + 2 * scores + router + experts  # layer 2: every input gradient
              + head)  # the head's input gradient (its weight is frozen)
  return batch * (forward + backward)


@pytest.mark.parametrize("scan", [False, True])
def test_moe_trainable_step_matches_a_hand_count(scan):
  cfg = _moe_cfg(scan_layers=scan)
  got = flops.train_step_flops(cfg, 2, 8, trainable="moe")
  assert got == _hand_moe_step(2, 8)
  # Every weight training is still 3x forward.
  assert flops.train_step_flops(cfg, 2, 8) == pytest.approx(
      2 * 3 * flops.pass_flops(cfg, 16, 16, 8)[0])


def test_pass_flops_forward_is_the_per_token_count():
  """The forward half agrees with ``forward_flops_per_token`` (already checked by hand)."""
  cfg = _moe_cfg(moe=moe.MoEConfig(num_experts=4, top_k=2, expert_dim=8, shared_expert_dim=6,
                                   shared_expert_gate=True), qkv_bias=True)
  fwd, bwd = flops.pass_flops(cfg, 10, 12, 10)
  assert fwd == pytest.approx(flops.forward_flops_per_token(cfg, 12) * 10)
  assert bwd == pytest.approx(2 * fwd)


def test_unknown_trainable_is_refused_by_name():
  with pytest.raises(ValueError, match="trainable.*'experts'"):
    flops.train_step_flops(_moe_cfg(), 1, 8, trainable="experts")


def _xla_and_ours(trainable):
  """XLA's count of the compiled train step and ``objective_step_flops``: 3 layers,
  layer 0 dense, one expert (top 1) so every dispatch computes the active FLOPs."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 64, 64, 3, 256
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 4, 16
  m.moe.num_experts, m.moe.top_k, m.moe.expert_dim, m.moe.impl = 1, 1, 256, "dense"
  m.moe.first_dense_layers = 1
  c.data.batch_size, c.data.seq_len = 1, 256
  c.train.trainable = trainable
  if trainable == "lora":
    m.lora.rank, m.lora.gated = 2, False
  return xla_and_counted_step_flops(c)


@pytest.mark.parametrize("trainable", ["moe", "lora"])
def test_frozen_weights_step_is_close_to_xlas_count(trainable):
  """MFU divides by this count. With ``trainable=moe`` it counted the frozen weights'
  gradients (1.5x XLA's here); with ``lora`` it left out the attention scores'
  backward (0.73x). Ours leaves out element-wise work: a little below XLA's (0.91x with
  every weight training on this shape), never far."""
  xla, ours = _xla_and_ours(trainable)
  assert 0.85 < ours / xla < 1.02, ours / xla
  # Against the all-training count's own ratio on the same shape (both leave out the same
  # element-wise work): within 3%, where a gradient group counted wrongly moves it 3-9%.
  xla_all, ours_all = _all_training_counts()
  assert (ours / xla) / (ours_all / xla_all) == pytest.approx(1.0, abs=0.03)


@functools.lru_cache(maxsize=None)
def _all_training_counts():
  return _xla_and_ours("all")


class _Split:
  """A finite split of ``n`` rows (row r holds r), read in batches of 2 that wrap."""

  def __init__(self, n):
    self.num_windows = n

  def get_batch(self, i):
    rows = np.arange(2 * i, 2 * i + 2) % self.num_windows
    return {"row": rows[:, None] * np.ones((2, 3)), "loss_mask": np.ones((2, 3), np.float32)}


def _row_step(params, batch, rng):
  """Per-token mean of the row index over scored tokens, and the scored count."""
  del params, rng
  mask = jnp.asarray(batch["loss_mask"])
  n = mask.sum()
  return {"nelbo": (jnp.asarray(batch["row"]) * mask).sum() / jnp.maximum(n, 1),
          "loss_tokens": n}


@pytest.mark.parametrize("n,batches,want_rows", [(3, 4, 3), (4, 4, 4), (5, 2, 4), (8, 4, 8)])
def test_validation_scores_each_row_of_a_small_split_once(n, batches, want_rows):
  """A split of 3 rows read as 4 batches of 2 would score row 0 three times."""
  val = trainer.evaluate_nelbo(_row_step, None, _Split(n), batches, seed=0)
  assert val["loss_tokens"] == 3 * want_rows
  assert val["nelbo"] == pytest.approx(np.mean(np.arange(want_rows)))


class _Rows:
  """A finite split of ``n`` rows (row r holds r) in batches of 2; ``None``: endless."""

  def __init__(self, n):
    if n is not None:
      self.num_windows = n
    self.n = n

  def get_batch(self, i):
    rows = np.arange(2 * i, 2 * i + 2) % (self.n or 1 << 30)
    return {"tokens": rows[:, None] * np.ones((2, 3), np.int32), "extra": np.zeros(2),
            "loss_mask": np.ones((2, 3), np.float32)}


@pytest.mark.parametrize("n,batches,want", [(3, 4, [0, 1, 2]), (4, 4, [0, 1, 2, 3]),
                                            (None, 2, [0, 1, 2, 3]), (8, 2, [0, 1, 2, 3])])
def test_dmoe_sweep_heldout_batches_read_each_row_once(n, batches, want):
  """``--batches=4`` of 2 rows on a 3-row split scored rows 0, 1, 2, 0, 1, 0, 1, 2."""
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  mod = load_experiment("dmoe_coverage_sweep")
  got = mod.heldout_batches(_Rows(n), batches)
  assert [int(r) for b in got for r in b["tokens"][:, 0]] == want
  assert all(set(b) == {"tokens", "loss_mask"} for b in got)
  assert all(len(b["loss_mask"]) == len(b["tokens"]) for b in got)


@pytest.mark.parametrize("objective", ["bd3", "fastdllm", "ar", "introspective"])
def test_trainer_counts_moe_only_training_for_every_objective(objective):
  """``objective_step_flops`` passed a frozen base only for LoRA: with trainable=moe
  every objective's MFU counted the frozen weights' gradients."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.diffusion import config as diffusion_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.vocab_size = 64
  c.diffusion.objective, c.diffusion.token_shift = objective, objective != "bd3"
  mcfg = model_config.model_config(c)
  obj = diffusion_config.objective(c, 63)
  full = trainer.objective_step_flops(c, mcfg, obj)
  c.train.trainable = "moe"
  frozen = trainer.objective_step_flops(c, mcfg, obj)
  assert frozen < full
  if not getattr(obj, "detach_clean", False):  # Else the clean stream runs forward only.
    assert frozen > full / 3  # Still a forward and some backward.
