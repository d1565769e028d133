"""ChatDLM summary tokens: layout, three attention paths that agree, training, decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET
from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.diffusion import losses
from blockdiff_jax.model import attention_ops
from blockdiff_jax.model import build
from blockdiff_jax.model import moe
from blockdiff_jax.model import summary as summary_lib
from blockdiff_jax.model import summary_attention
from blockdiff_jax.model import transformer
from pallas_kernels import block_attention as ba

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

SMALL_TILES = ba.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _layout_meta(streams, length, block, slots, batch=1, segments=None):
  """Metadata of ``[x_t ;] x_0 ; slots`` built independently of the model."""
  pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
  clean = masks.make_meta(pos, block, masks.CLEAN, segments)
  meta = clean
  if streams == 2:
    meta = masks.make_meta(pos, block, masks.NOISY, segments).concat(clean)
  return meta.concat(masks.summary_slots_meta(clean, block, slots))


def test_slot_meta_positions_and_segments():
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, -1, -1]])
  clean = masks.make_meta(jnp.arange(8)[None], 4, masks.CLEAN, seg)
  slots = masks.summary_slots_meta(clean, 2, 3)
  # Block c's 3 slots sit at its last position, with its block id and last segment.
  np.testing.assert_array_equal(slots.positions[0], np.repeat([1, 3, 5, 7], 3))
  np.testing.assert_array_equal(slots.block_ids[0], np.repeat([0, 0, 1, 1], 3))
  np.testing.assert_array_equal(slots.segment_ids[0], np.repeat([0, 1, 1, -1], 3))
  assert bool(jnp.all(slots.is_summary)) and bool(jnp.all(slots.stream == masks.CLEAN))
  with pytest.raises(ValueError, match="multiple of block_size=3"):
    masks.summary_slots_meta(clean, 3, 1)


def test_layout_rules_by_hand():
  # 4 clean blocks of 2 + 1 slot each, W = 1, BD3 layout: check the rules of the brief.
  meta = _layout_meta(2, 8, 2, 1)
  m = np.asarray(masks.dense_mask(meta, meta, masks.MaskSpec(window_blocks=1))[0])
  stream = np.asarray(meta.stream[0])
  summ = np.asarray(meta.is_summary[0])
  blk = np.asarray(meta.block_ids[0])
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      if summ[i]:  # a slot: its own clean block and its sibling slots
        want = stream[j] == masks.CLEAN and blk[j] == blk[i]
      elif summ[j]:  # a token sees slots of blocks older than its window only
        want = blk[j] < blk[i] - 1
      elif stream[i] == masks.NOISY:
        want = (stream[j] == masks.NOISY and blk[j] == blk[i]) or (
            stream[j] == masks.CLEAN and blk[i] - 1 <= blk[j] < blk[i])
      else:
        want = stream[j] == masks.CLEAN and blk[i] - 1 <= blk[j] <= blk[i]
      assert m[i, j] == want, (i, j)


def _qkv(total, heads, kv_heads, head_dim, batch=1, seed=0):
  rng = np.random.default_rng(seed)
  shape = lambda h: (batch, total, h, head_dim)
  return [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in (shape(heads), shape(kv_heads), shape(kv_heads), shape(heads))]


ATTN_CASES = {
    # name: (streams, length, block, slots, window, heads, kv_heads, batch, segments)
    "bd3_gqa": (2, 24, 4, 2, 2, 4, 2, 1, None),
    "clean_mha_w1": (1, 32, 8, 1, 1, 2, 2, 1, None),
    "bd3_packed_padded": (2, 16, 4, 2, 1, 2, 1, 2,
                          np.array([[0] * 6 + [1] * 10, [0] * 13 + [-1] * 3])),
}


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_three_attention_paths_agree(name):
  streams, length, block, slots, window, heads, kv_heads, batch, seg = ATTN_CASES[name]
  seg = None if seg is None else jnp.asarray(seg)
  meta = _layout_meta(streams, length, block, slots, batch, seg)
  spec = masks.MaskSpec(window_blocks=window)
  layout = masks.SummaryLayout(streams, block, slots)
  q, k, v, do = _qkv(meta.shape[1], heads, kv_heads, 8, batch)
  paths = {
      "dense": lambda q, k, v: attention_ops.masked_attention(q, k, v, meta, meta, spec),
      "structured": lambda q, k, v: summary_attention.structured_attention(
          q, k, v, meta, layout, spec),
      "pallas": lambda q, k, v: ba.block_attention(q, k, v, meta, meta, spec=spec,
                                                   block_sizes=SMALL_TILES,
                                                   interpret=INTERPRET),
  }

  def fwd_bwd(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)

  results = {n: jax.jit(lambda f=f: fwd_bwd(f))() for n, f in paths.items()}
  ref_out, ref_grads = results["dense"]
  assert float(jnp.max(jnp.abs(ref_out))) > 0.1  # the case is not degenerate
  for n in ("structured", "pallas"):
    out, grads = results[n]
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-4, err_msg=n)
    for got, want, label in zip(grads, ref_grads, "qkv"):
      np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4, err_msg=f"{n} d{label}")


def test_structured_path_never_builds_a_full_array():
  # 16 blocks of 8 + 2 slots, W = 1: the largest intermediate must be far below T x T.
  streams, length, block, slots, window = 2, 128, 8, 2, 1
  meta = _layout_meta(streams, length, block, slots)
  total = meta.shape[1]
  q, k, v, _ = _qkv(total, 1, 1, 4)
  fn = lambda q, k, v: summary_attention.structured_attention(
      q, k, v, meta, masks.SummaryLayout(streams, block, slots),
      masks.MaskSpec(window_blocks=window))
  hlo = jax.jit(fn).lower(q, k, v).as_text()
  dense_hlo = jax.jit(lambda q, k, v: attention_ops.masked_attention(
      q, k, v, meta, meta, masks.MaskSpec(window_blocks=window))).lower(q, k, v).as_text()
  full = f"{total}x{total}"
  assert full in dense_hlo  # the check can see a T x T array when there is one
  assert full not in hlo and f"{streams * length}x{streams * length}" not in hlo


def _model_cfg(impl="xla", slots=2, window=1, block=4, **kw):
  base = dict(vocab_size=24, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=48, attention_impl=impl, interpret=INTERPRET,
              summary=summary_lib.SummaryConfig(slots, window, block))
  base.update(kw)
  return transformer.TransformerConfig(**base)


def _bd3_batch(length=16, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 23, size=(batch, length)), jnp.int32)
  return {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}


@pytest.fixture(scope="module")
def bd3_objective():
  return losses.BlockDiffusionObjective(block_size=4, mask_id=23)


def _loss_fn(model, obj):
  apply_fn = build.make_apply(model)
  def loss(params, batch):
    return losses.block_diffusion_loss(apply_fn, params, batch, jax.random.key(3), obj)[0]
  return jax.jit(jax.value_and_grad(loss))


def test_model_impls_agree_through_bd3_loss(bd3_objective):
  # The same params give the same BD3 loss and gradients with all three attention paths.
  batch = _bd3_batch()
  results = {}
  params = None
  for impl in ("xla", "structured", "pallas"):
    model = transformer.Transformer(_model_cfg(impl, num_layers=1))
    if params is None:
      params = build.init_params(model, 0)
      assert params["summary_embed"].shape == (2, 32)
    results[impl] = _loss_fn(model, bd3_objective)(params, batch)
  ref_loss, ref_grads = results["xla"]
  assert np.isfinite(float(ref_loss))
  # The slots are trained through the clean stream: their embedding gets a gradient.
  assert float(jnp.max(jnp.abs(ref_grads["summary_embed"]))) > 0
  for impl in ("structured", "pallas"):
    loss, grads = results[impl]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=impl)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4,
                                                         err_msg=impl), grads, ref_grads)


def test_slots_are_extra_positions_without_loss(bd3_objective):
  # Logits have the input's shape; slots change them only by what older blocks see.
  # (An MoE model: the slots go through the router like clean tokens of their block.)
  model = transformer.Transformer(_model_cfg(
      moe=moe.MoEConfig(num_experts=4, expert_dim=16), first_dense_layers=1))
  params = build.init_params(model, 0)
  tokens = _bd3_batch(length=16)["tokens"]
  meta = masks.training_meta(16, 4, 2)
  x = jnp.concatenate([tokens, tokens], axis=1)
  apply = jax.jit(lambda p: model.apply({"params": p}, x, meta, return_kv=True,
                                        summary="bd3"))
  logits, aux = apply(params)
  assert logits.shape == (2, 32, 24)
  assert aux["kv"][0].shape == (2, 2, 32, 2, 8)
  assert aux["summary_kv"][0].shape == (2, 2, 16 // 4 * 2, 2, 8)
  # Blocks 0 and 1 (window W=1) see no slots: changing the slot table leaves them be;
  # block 3's noisy queries read block 1's slots, so they move.
  moved = dict(params, summary_embed=params["summary_embed"] + 1.0)
  logits2, _ = apply(moved)
  diff = jnp.max(jnp.abs(logits2 - logits), axis=(0, 2))
  noisy = np.asarray(diff[:16]).reshape(4, 4).max(axis=1)
  assert noisy[0] == 0 and noisy[1] == 0 and noisy[3] > 1e-4


def test_summarize_block_matches_training_forward():
  # Committing blocks one by one (each against a fixed-size cache holding all
  # earlier full K/V and slot K/V, empty slots at segment -1; the mask picks the
  # window and the slots) reproduces the clean-only full-sequence forward: the
  # blocks' K/V and their summary K/V.
  model = transformer.Transformer(_model_cfg(window=1, block=4))
  params = build.init_params(model, 0)
  length, block = 16, 4
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 23, size=(1, length)), jnp.int32)
  meta = masks.make_meta(jnp.arange(length)[None], block, masks.CLEAN)
  _, aux = jax.jit(lambda p: model.apply({"params": p}, tokens, meta, return_kv=True,
                                         summary="clean"))(params)
  full_k, full_v = aux["kv"]
  full_sk, full_sv = aux["summary_kv"]

  slots = 2
  nb = length // block
  cap = length + nb * slots
  cache = {"k": jnp.zeros((2, 1, cap, 2, 8)), "v": jnp.zeros((2, 1, cap, 2, 8)),
           "meta": masks.make_meta(jnp.zeros((1, cap), jnp.int32), block, masks.CLEAN,
                                   -jnp.ones((1, cap), jnp.int32))}
  commit = jax.jit(lambda p, t, m, c: summary_lib.summarize_block(model, p, t, m, c))
  write = lambda a, x, at: jax.lax.dynamic_update_slice_in_dim(a, x, at, axis=-1)
  for c in range(nb):
    sl = slice(c * block, (c + 1) * block)
    _, (k, v), summ = commit(params, tokens[:, sl], meta.slice(c * block, block), cache)
    np.testing.assert_allclose(k, full_k[:, :, sl], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(v, full_v[:, :, sl], atol=1e-5, rtol=1e-4)
    ss = slice(c * slots, (c + 1) * slots)
    np.testing.assert_allclose(summ.k, full_sk[:, :, ss], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(summ.v, full_sv[:, :, ss], atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(summ.meta.positions, aux["summary_meta"].positions[:, ss])
    at = c * (block + slots)
    new_meta = meta.slice(c * block, block).concat(summ.meta)
    cache = {"k": jnp.moveaxis(write(jnp.moveaxis(cache["k"], 2, -1),
                                     jnp.moveaxis(jnp.concatenate([k, summ.k], 2), 2, -1),
                                     at), -1, 2),
             "v": jnp.moveaxis(write(jnp.moveaxis(cache["v"], 2, -1),
                                     jnp.moveaxis(jnp.concatenate([v, summ.v], 2), 2, -1),
                                     at), -1, 2),
             "meta": jax.tree.map(lambda a, x: write(a, x, at), cache["meta"], new_meta)}


def test_config_fields_and_validation():
  c = config_lib.base_config()
  c.model.summary.num_slots = 2
  c.model.summary.window_blocks = 3
  c.model.attention_impl = "structured"
  config_lib.validate(c)
  cfg = config_lib.model_config(c, vocab_size=32)
  assert cfg.summary == summary_lib.SummaryConfig(2, 3, c.diffusion.block_size)
  assert cfg.mask_spec.window_blocks == 3
  bad = c.copy_and_resolve_references()
  bad.model.summary.window_blocks = 0
  with pytest.raises(ValueError, match="model.summary.window_blocks"):
    config_lib.validate(bad)
  bad = c.copy_and_resolve_references()
  bad.model.summary.num_slots = 0
  with pytest.raises(ValueError, match="attention_impl='structured'"):
    config_lib.validate(bad)
  with pytest.raises(ValueError, match="needs summary tokens"):
    model = transformer.Transformer(dataclasses.replace(_model_cfg(), summary=None))
    tokens = jnp.zeros((1, 8), jnp.int32)
    model.init(jax.random.key(0), tokens, masks.make_meta(jnp.arange(8)[None], 4, 1),
               summary="clean")


def test_pallas_kernel_visits_only_window_and_bank_tiles():
  # 16 blocks of 32 tokens + 2 slots each, W = 1, tiles of 32: a query tile (one
  # block) visits its own block, the block before it and the one tile of the bank;
  # the slot tile visits every block. Block-causal full attention visits 136 tiles.
  from pallas_kernels.block_attention import kernel  # pylint: disable=g-import-not-at-top
  n, block, slots = 512, 32, 2
  clean = masks.make_meta(jnp.arange(n)[None], block, masks.CLEAN)
  meta = clean.concat(masks.summary_slots_meta(clean, block, slots))
  total = meta.shape[1]  # 544 = 17 tiles
  packed = kernel.pack_meta(meta, total)
  states = np.asarray(kernel.tile_map(packed, packed, masks.MaskSpec(window_blocks=1),
                                      32, 32))[0]
  visited = states != kernel.EMPTY
  nb = n // block
  want = np.zeros_like(visited)
  for c in range(nb):
    want[c, max(c - 1, 0):c + 1] = True
    want[c, nb] = c >= 2  # blocks 0 and 1 have no block older than their window
  want[nb, :] = True
  np.testing.assert_array_equal(visited, want)
  full = masks.make_meta(jnp.arange(n)[None], block, masks.CLEAN)
  full_states = np.asarray(kernel.tile_map(kernel.pack_meta(full, n), kernel.pack_meta(full, n),
                                           masks.MaskSpec(), 32, 32))
  assert int((full_states != kernel.EMPTY).sum()) == nb * (nb + 1) // 2
  assert int(visited.sum()) == 2 * nb - 1 + (nb - 2) + nb + 1


def test_decoding_against_a_hierarchical_cache_matches_training():
  # Denoising block c against a cache of the committed blocks (from summarize_block)
  # gives the training forward's noisy logits for block c, both with every block's
  # full K/V kept and with only the last W blocks' full K/V plus older blocks'
  # summary K/V (the hierarchical cache: older full K/V dropped as segment -1).
  window, block, length = 1, 4, 16
  model = transformer.Transformer(_model_cfg(window=window, block=block))
  params = build.init_params(model, 1)
  rng = np.random.default_rng(7)
  x0 = jnp.asarray(rng.integers(0, 23, size=(1, length)), jnp.int32)
  xt = jnp.where(jnp.asarray(rng.random((1, length)) < 0.5), 23, x0)
  train_logits, _ = jax.jit(lambda p: build.make_apply(model)(
      p, jnp.concatenate([xt, x0], 1), masks.training_meta(length, block)))(params)

  clean = masks.make_meta(jnp.arange(length)[None], block, masks.CLEAN)
  commit = jax.jit(lambda p, t, m, c: summary_lib.summarize_block(model, p, t, m, c))
  denoise = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, cache=c))
  cat = lambda a, b: b if a is None else jax.tree.map(
      lambda x, y: jnp.concatenate([x, y], axis=-1), a, b)
  full_kv, slot_kv, full_meta, slot_meta = None, None, None, None
  for c in range(length // block):
    noisy_meta = masks.make_meta(c * block + jnp.arange(block)[None], block, masks.NOISY)
    want = train_logits[:, c * block:(c + 1) * block]
    if c:
      old = full_meta.block_ids < c - window
      hier_meta = dataclasses.replace(full_meta,
                                      segment_ids=jnp.where(old, -1, full_meta.segment_ids))
      for kept_meta in (full_meta, hier_meta):
        cache = {"k": jnp.concatenate([full_kv[0], slot_kv[0]], 2),
                 "v": jnp.concatenate([full_kv[1], slot_kv[1]], 2),
                 "meta": kept_meta.concat(slot_meta)}
        got, _ = denoise(params, xt[:, c * block:(c + 1) * block], noisy_meta, cache)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"block {c}")
    else:
      got, _ = denoise(params, xt[:, :block], noisy_meta, None)
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    sl = slice(c * block, (c + 1) * block)
    cache = None if c == 0 else {"k": jnp.concatenate([full_kv[0], slot_kv[0]], 2),
                                 "v": jnp.concatenate([full_kv[1], slot_kv[1]], 2),
                                 "meta": hier_meta.concat(slot_meta)}
    _, kv, summ = commit(params, x0[:, sl], clean.slice(c * block, block), cache)
    full_kv = kv if full_kv is None else tuple(jnp.concatenate([a, b], 2)
                                               for a, b in zip(full_kv, kv))
    slot_kv = (summ.k, summ.v) if slot_kv is None else (
        jnp.concatenate([slot_kv[0], summ.k], 2), jnp.concatenate([slot_kv[1], summ.v], 2))
    full_meta = cat(full_meta, clean.slice(c * block, block))
    slot_meta = cat(slot_meta, summ.meta)
