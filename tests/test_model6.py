"""Model hardening, sixth pass: negative token ids, the logits slice and upcycled routers
that do not depend on the params' key order, each against an independent reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import config as model_config_lib
from blockdiff_jax.model import summary as summary_lib
from blockdiff_jax.model import transformer

VOCAB = 40


def _tiny(**kw):
  cfg = transformer.TransformerConfig(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=32, **kw)
  model = transformer.Transformer(cfg)
  meta = masks.training_meta(4, 2, 1)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), meta)["params"])
  return model, params, meta


# --- Negative ids: NaN like any other id outside the table, never a wrapped-around row. ---


@pytest.mark.parametrize("bad_id", [-1, -2, -VOCAB])
def test_negative_token_ids_give_nan_not_a_wrapped_row(bad_id):
  # Before: -1 read row VOCAB - 1 (Python-style wrap-around), -VOCAB row 0: finite
  # logits, identical to feeding that real token, from a pad or ignore-label id.
  model, params, meta = _tiny()
  tokens = jnp.arange(8, dtype=jnp.int32)[None] % VOCAB
  bad = tokens.at[0, 3].set(bad_id)
  logits, _ = model.apply({"params": params}, bad, meta)
  assert bool(jnp.isnan(logits[0, 3]).all())
  # The real token the id would wrap to gives finite logits: the NaN is the id's own.
  wrapped = tokens.at[0, 3].set(bad_id % VOCAB)
  ok, _ = model.apply({"params": params}, wrapped, meta)
  assert bool(jnp.isfinite(ok).all())


@pytest.mark.parametrize("pad_id", [-1, -100, VOCAB + 3])
def test_a_bad_id_at_a_padded_position_leaves_the_real_positions_alone(pad_id):
  # Attention drops padded keys with weight 0, and 0 * NaN is NaN: a NaN embedding at a
  # pad turned every position's logits into NaN (review of the negative-id change).
  model, params, _ = _tiny()
  seg = jnp.asarray([[0, 0, 0, 0, 0, -1, -1, -1]], jnp.int32)
  meta = masks.make_meta(jnp.arange(8)[None], 2, masks.CLEAN, seg)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 0, 0, 0]], jnp.int32)
  want, _ = model.apply({"params": params}, tokens, meta)
  got, _ = model.apply({"params": params}, tokens.at[0, 5:].set(pad_id), meta)
  assert bool(jnp.isfinite(got[0, :5]).all())
  np.testing.assert_allclose(np.asarray(got[0, :5]), np.asarray(want[0, :5]), rtol=1e-6,
                             atol=1e-6)
  # The same id at a real position is still loud.
  loud, _ = model.apply({"params": params}, tokens.at[0, 4].set(pad_id), meta)
  assert bool(jnp.isnan(loud[0, 4]).all())


def test_valid_ids_still_read_their_embedding_rows():
  model, params, _ = _tiny()
  meta = masks.make_meta(jnp.arange(4)[None], 2, masks.CLEAN)
  tokens = jnp.asarray([[0, VOCAB - 1, 5, 0]], jnp.int32)
  _, aux = model.apply({"params": params}, tokens, meta, return_kv=True)
  # The value projection of layer 0 reads RMSNorm(embedding row): recompute it by hand.
  table = np.asarray(params["embed"]["embedding"], np.float64)
  rows = table[np.asarray(tokens[0])]
  normed = rows / np.sqrt(np.mean(rows ** 2, axis=-1, keepdims=True) + 1e-6)
  normed = normed * np.asarray(params["layer_0"]["attn_norm"]["scale"])
  kernel = np.asarray(params["layer_0"]["attention"]["value"]["DenseGeneral_0"]["kernel"])
  want = np.einsum("td,dhk->thk", normed, kernel)
  np.testing.assert_allclose(np.asarray(aux["kv"][1][0, 0]), want, rtol=1e-4, atol=1e-5)


# --- logits_slice: the rows asked for, or an error naming the slice. ---


@pytest.mark.parametrize("start,length", [(0, 8), (3, 2), (7, 1), (8, 0)])
def test_logits_slice_equals_the_full_logits_sliced(start, length):
  model, params, meta = _tiny()
  tokens = (jnp.arange(8, dtype=jnp.int32)[None] * 7) % VOCAB
  full, _ = model.apply({"params": params}, tokens, meta)
  part, _ = model.apply({"params": params}, tokens, meta, logits_slice=(start, length))
  assert part.shape == (1, length, VOCAB)
  np.testing.assert_allclose(part, full[:, start:start + length], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start,length", [(-1, 1), (6, 4), (9, 0), (2, -1)])
def test_logits_slice_outside_the_input_is_refused(start, length):
  # Before: (-1, 1) gave zero rows (x[:, -1:0]), (6, 4) two rows instead of four, with
  # no error; the caller then lined up the wrong number of logits with its tokens.
  model, params, meta = _tiny()
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=rf"logits_slice=\(start={start}, length={length}\)"):
    model.apply({"params": params}, tokens, meta, logits_slice=(start, length))


# --- Summary tokens: a bad block size is named as the field the user sets. ---


def test_summary_block_size_error_names_the_diffusion_field():
  # Before: "model.summary.block_size must be >= 1", a field that does not exist (the
  # size is diffusion.block_size), from model.config.validate / build.build_model.
  c = config_lib.base_config()
  c.model.summary.num_slots = 2
  c.diffusion.block_size = 0
  with pytest.raises(ValueError, match=r"^diffusion\.block_size must be >= 1.*got 0"):
    model_config_lib.validate(c)
  with pytest.raises(ValueError, match=r"^model\.summary\.window_blocks must be >= 1"):
    summary_lib.SummaryConfig(num_slots=2, window_blocks=0, block_size=4)
