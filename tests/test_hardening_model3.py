"""Model and kernel edges, third pass: negative GMM group sizes, nested-list inputs to the
forward pass and non-integer sizes in the static configs, each against a reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import lora
from blockdiff_jax.model import moe
from blockdiff_jax.model import summary
from blockdiff_jax.model import transformer
from pallas_kernels import gmm
from pallas_kernels.gmm import reference as gmm_reference

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

# --- GMM: a negative group size is an empty group, never garbage rows. ---

M, K, N = 16, 16, 16
LHS = np.asarray(jax.random.normal(jax.random.key(0), (M, K)), np.float64)
RHS = np.asarray(jax.random.normal(jax.random.key(1), (3, K, N)), np.float64)
DOUT = np.asarray(jax.random.normal(jax.random.key(2), (M, N)), np.float64)


def _row_groups(sizes):
  """Row ranges of each group with negative sizes as empty and sums clipped to M."""
  start, out = 0, []
  for s in sizes:
    end = min(start + max(int(s), 0), M)
    out.append((start, end))
    start = end
  return out


def _gmm_loop(sizes):
  out = np.zeros((M, N))
  for g, (lo, hi) in enumerate(_row_groups(sizes)):
    out[lo:hi] = LHS[lo:hi] @ RHS[g]
  return out


def _tgmm_loop(sizes):
  return np.stack([LHS[lo:hi].T @ DOUT[lo:hi] for lo, hi in _row_groups(sizes)])


@pytest.mark.parametrize("sizes", [[5, -2, 8], [-3, 10, 4]])
def test_traced_negative_group_sizes_count_as_empty_groups(sizes):
  # Before: the bounds of [5, -2, 8] decreased and the schedule left rows unwritten
  # (max |diff| 12.6 against this loop); tgmm of [-3, 10, 4] gave NaN.
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)

  @jax.jit
  def run(lhs, rhs, dout, gs):
    out, vjp = jax.vjp(lambda a, b: gmm.gmm(a, b, gs, interpret=True), lhs, rhs)
    return out, vjp(dout), gmm.tgmm(lhs, dout, gs, interpret=True)

  out, (dlhs, drhs), t = run(f32(LHS), f32(RHS), f32(DOUT), gs)
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out, _gmm_loop(sizes), **tol)
  np.testing.assert_allclose(t, _tgmm_loop(sizes), **tol)
  np.testing.assert_allclose(drhs, _tgmm_loop(sizes), **tol)
  want_dlhs = np.zeros((M, K))
  for g, (lo, hi) in enumerate(_row_groups(sizes)):
    want_dlhs[lo:hi] = DOUT[lo:hi] @ RHS[g].T
  np.testing.assert_allclose(dlhs, want_dlhs, **tol)
  np.testing.assert_allclose(gmm_reference.gmm_reference(f32(LHS), f32(RHS), gs),
                             _gmm_loop(sizes), **tol)


def test_concrete_negative_group_sizes_are_refused():
  gs = jnp.asarray([5, -2, 8], jnp.int32)
  lhs = jnp.asarray(LHS, jnp.float32)
  with pytest.raises(ValueError, match=r"gmm: group_sizes must be >= 0, got \[5, -2, 8\]"):
    gmm.gmm(lhs, jnp.asarray(RHS, jnp.float32), gs, interpret=True)
  with pytest.raises(ValueError, match=r"tgmm: group_sizes must be >= 0"):
    gmm.tgmm(lhs, lhs, gs, interpret=True)


# --- The forward pass takes nested lists as a hand-written prompt would give them. ---


def test_forward_accepts_tokens_and_metadata_as_nested_lists():
  cfg = transformer.TransformerConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=32)
  model = transformer.Transformer(cfg)
  tokens = [[3, 1, 4, 1, 5, 9, 2, 6]]
  meta = masks.make_meta(jnp.arange(8)[None], 4, masks.CLEAN)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens), meta)
  want = jax.jit(lambda p, t, m: model.apply(p, t, m)[0])(params, jnp.asarray(tokens), meta)
  # Before: AttributeError: 'list' object has no attribute 'shape' / 'astype'. Closed
  # over (not arguments) the lists reach the model as lists, as in an eager call.
  as_lists = masks.TokenMeta(*(np.asarray(getattr(meta, f.name)).tolist()
                               for f in dataclasses.fields(meta)))
  got = jax.jit(lambda p: model.apply(p, tokens, as_lists)[0])(params)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --- Static sizes must be integers: 2.5 passes a ">= 1" check and fails far away. ---

_DENSE = dict(vocab_size=40, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
              head_dim=8, mlp_dim=32)


@pytest.mark.parametrize("make,message", [
    (lambda: summary.SummaryConfig(num_slots=1, window_blocks=1, block_size=2.5),
     "diffusion.block_size must be an integer, got 2.5"),
    (lambda: summary.SummaryConfig(num_slots=1.0, window_blocks=1, block_size=4),
     "model.summary.num_slots must be an integer, got 1.0"),
    (lambda: transformer.TransformerConfig(**{**_DENSE, "num_heads": 2.0}),
     "model.num_heads must be an integer, got 2.0"),
    (lambda: transformer.TransformerConfig(**_DENSE, first_dense_layers=0.5),
     "model.first_dense_layers must be an integer, got 0.5"),
    (lambda: moe.MoEConfig(num_experts=4, expert_dim=6.5),
     "model.moe.expert_dim must be an integer, got 6.5"),
    (lambda: lora.LoraConfig(rank=4.5, gated=False),
     "model.lora.rank must be an integer, got 4.5"),
    (lambda: masks.SummaryLayout(streams=2, block_size=2.5, num_slots=1),
     "SummaryLayout.block_size must be an integer, got 2.5"),
], ids=["block_size", "num_slots", "num_heads", "first_dense_layers", "expert_dim",
        "lora_rank", "layout_block_size"])
def test_non_integer_sizes_are_refused_naming_the_field(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_numpy_integer_sizes_still_build():
  cfg = transformer.TransformerConfig(**{**_DENSE, "d_model": np.int64(16)},
                                      summary=summary.SummaryConfig(1, 1, np.int32(4)))
  assert cfg.d_model == 16 and cfg.summary.block_size == 4
