"""Long-context hardening, second pass: the structured path's alignment check, a factor
bank sized to the chunks that can leave the ring, and decoding audits (lossy caches whose
ring holds the context, summary slots written once, reconstruction error against rank)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops
from blockdiff_jax.model import build
from blockdiff_jax.model import kv_memory
from blockdiff_jax.model import summary_attention
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import state as state_lib
from blockdiff_jax.sampling import step as step_lib

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


# --- Structured summary attention: metadata that does not follow the layout. ---

def _summary_input(offsets, streams=1, block=4, slots=1, length=16, seed=0):
  """q, k, v and metadata of rows whose positions start at ``offsets[row]``."""
  pos = jnp.arange(length)[None] + jnp.asarray(offsets)[:, None]
  clean = masks.make_meta(pos, block, masks.CLEAN)
  meta = clean if streams == 1 else masks.make_meta(pos, block, masks.NOISY).concat(clean)
  meta = meta.concat(masks.summary_slots_meta(clean, block, slots))
  total, b = meta.shape[-1], len(offsets)
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(keys[0], (b, total, 2, 4))
  k = jax.random.normal(keys[1], (b, total, 1, 4))
  v = jax.random.normal(keys[2], (b, total, 1, 4))
  return q, k, v, meta, masks.SummaryLayout(streams, block, slots)


@pytest.mark.parametrize("streams,offset", [(1, 2), (2, 3), (2, 1)])
def test_structured_path_rejects_a_stream_starting_inside_a_block(streams, offset):
  # Before the check this returned silently wrong rows (max |diff| 1.5 against the dense
  # reference for offset 2): the block views group tokens by index, the mask by block id.
  q, k, v, meta, lay = _summary_input([offset], streams)
  spec = masks.MaskSpec(causal_noisy=True, window_blocks=1)
  with pytest.raises(ValueError, match=r"block_ids \[0, .*positions from " + str(offset)):
    summary_attention.structured_attention(q, k, v, meta, lay, spec)


def test_structured_path_under_jit_poisons_only_misaligned_rows():
  q, k, v, meta, lay = _summary_input([8, 2], streams=2)  # Row 0: starts at block 2.
  spec = masks.MaskSpec(causal_noisy=True, window_blocks=2)
  got = jax.jit(lambda q, k, v, m: summary_attention.structured_attention(
      q, k, v, m, lay, spec))(q, k, v, meta)
  want = attention_ops.masked_attention(q, k, v, meta, meta, spec)
  np.testing.assert_allclose(got[0], want[0], atol=2e-5)
  assert np.isnan(np.asarray(got[1])).all()


def test_structured_path_still_rejects_a_ragged_stream_length():
  q, k, v, meta, lay = _summary_input([0], length=16)
  cut = lambda x: x[:, 2:]  # 14 tokens: not whole blocks of 4.
  meta = masks.TokenMeta(*(cut(x) for x in dataclasses.astuple(meta)))
  with pytest.raises(ValueError, match="length 18 is not streams.*must be a multiple of B"):
    summary_attention.structured_attention(cut(q), cut(k), cut(v), meta, lay,
                                           masks.MaskSpec(window_blocks=1))


# --- The factor bank holds exactly the chunks that can leave the ring. ---

SETTINGS = [(24, 1, 4, 2), (40, 2, 4, 1), (37, 1, 3, 2), (61, 3, 5, 0)]  # capacity, W, chunk, sinks


def _fill(capacity, window, chunk, sinks, batch=2):
  """A cache whose rows commit chunk-wide steps to the capacity, row 1 lagging behind."""
  spec = kv_cache.KVSpec(num_layers=2, num_kv_heads=1, head_dim=4)
  hy = hc.Hierarchy(window=window, chunk=chunk, rank=2, sinks=sinks)
  cache = hc.HierarchicalKVCache.empty(spec, batch, capacity, chunk, hy)
  commit = jax.jit(lambda c, k, v, s, r: c.commit(k, v, s, r))
  rng = np.random.default_rng(capacity)
  written = set()
  frontier = np.zeros(batch, int)
  while frontier.min() < capacity:
    rows = (frontier < capacity) & ((np.arange(batch) == 0) | (rng.random(batch) < 0.6))
    k = jnp.asarray(rng.normal(size=(2, batch, chunk, 1, 4)) + 1.0, jnp.float32)
    cache = commit(cache, k, k, jnp.asarray(frontier, jnp.int32), jnp.asarray(rows))
    frontier = np.where(rows, np.minimum(frontier + chunk, capacity), frontier)
    written |= set(np.nonzero(np.asarray(jnp.any(cache.bank_ka != 0, (0, 3, 4, 5))))[1])
  return spec, hy, cache, written


@pytest.mark.parametrize("capacity,window,chunk,sinks", SETTINGS)
def test_every_bank_chunk_is_used_and_the_planner_counts_the_arrays(capacity, window, chunk,
                                                                    sinks):
  spec, hy, cache, written = _fill(capacity, window, chunk, sinks)
  # Chunks starting below capacity - ring leave the ring; the bank had room for
  # ceil(capacity / chunk) before (2 to 4 of them never written here).
  compressible = len(range(0, capacity - hy.ring, chunk))
  assert int(cache.compressed.max()) == compressible
  assert cache.bank_ka.shape[2] == compressible and written == set(range(compressible))
  leaves = jax.tree.leaves(hc.empty_cache(spec, 3, capacity, chunk, hierarchy=hy))
  held = sum(x.size * x.dtype.itemsize for x in leaves)
  assert held == kv_memory.hierarchical_cache_bytes(2, 1, 4, jnp.float32, 3, capacity,
                                                    window, chunk, 2, sinks)
  assert held == hc.cache_bytes(spec, 3, capacity, hy)


def test_plan_reports_the_bytes_the_decoder_allocates():
  from blockdiff_jax.train import plan  # pylint: disable=g-import-not-at-top
  c = small_model_config(vocab_size=300)
  c.sample.max_len = 1000
  c.sample.kv_window, c.sample.kv_chunk, c.sample.kv_rank = 2, 64, 4
  dc = plan.plan(c, num_devices=1)["decode_cache"]
  model, _ = build.build_model(c)
  spec = logits_lib.as_logits_fn(model).kv_spec
  shapes = jax.eval_shape(lambda: hc.empty_cache(
      spec, dc["rows"], dc["capacity"], c.diffusion.block_size, dc["buffer"],
      hierarchy=hc.Hierarchy(2, 64, 4)))
  bank = shapes.bank_ka.shape[2]
  assert bank == -(-(dc["capacity"] - 3 * 64) // 64)  # Not ceil(capacity / 64).
  held = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
  assert dc["hierarchical"] == held


def test_a_hierarchical_cache_without_bank_reads_like_the_full_cache():
  # Built directly with a ring that holds every position: no bank chunk, and commits and
  # views still work (the decoders pick the full cache in that case).
  spec = kv_cache.KVSpec(num_layers=1, num_kv_heads=1, head_dim=4)
  cache = hc.HierarchicalKVCache.empty(spec, 2, 12, 4, hc.Hierarchy(window=3, chunk=4, rank=1))
  full = kv_cache.KVCache.empty(spec, 2, 12, 4)
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(1, 2, 4, 1, 4)), jnp.float32)
  cache, full = (c.prefill(k, k, jnp.ones((2, 4), bool)) for c in (cache, full))
  start, rows = jnp.asarray([4, 4], jnp.int32), jnp.asarray([True, False])
  cache, full = (c.commit(2 * k, k, start, rows) for c in (cache, full))
  assert cache.bank_ka.shape[2] == 0
  view, want = hc.dense_view(cache.attention_view()), full.attention_view()
  for row in range(2):
    got_rows = {int(p): np.asarray(view["k"][0, row, j])
                for j, p in enumerate(np.asarray(view["meta"].positions[row]))
                if view["meta"].segment_ids[row, j] >= 0}
    want_rows = {j: np.asarray(want["k"][0, row, j]) for j in range(12)
                 if want["meta"].segment_ids[row, j] >= 0}
    assert sorted(got_rows) == sorted(want_rows)
    for p, x in want_rows.items():
      np.testing.assert_array_equal(got_rows[p], x)


# --- Factored K/V: the error falls with the rank and vanishes at full rank. ---

def _np_rope(x, positions, inv_freq):
  """Half-split RoPE of x [..., T, H, D] by positions [T] (numpy, float64)."""
  ang = positions[:, None] * np.asarray(inv_freq)[None]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("chunk,head_dim", [(6, 4), (4, 6)])
def test_reconstruction_error_is_the_svd_tail_and_falls_with_rank(chunk, head_dim):
  # RoPE is orthogonal per position, so a key chunk's error is that of its unrotated
  # rows: the tail of their singular values (Eckart-Young), as for the values.
  rng = np.random.default_rng(3)
  n, window = 4 * chunk, 1
  inv_freq = tuple(float(x) for x in 1.0 / 50.0 ** (np.arange(0, head_dim, 2) / head_dim))
  raw = rng.normal(size=(1, 2, n, 1, head_dim)) * np.linspace(3, 0.2, head_dim)
  keys = _np_rope(raw, np.arange(n, dtype=np.float64), inv_freq)
  spec = kv_cache.KVSpec(1, 1, head_dim, inv_freq=inv_freq)
  lengths = np.array([n, n - chunk])  # Rows at different frontiers.
  valid = jnp.asarray(np.arange(n)[None] < lengths[:, None])
  errors = []
  for rank in range(1, chunk + 1):
    hy = hc.Hierarchy(window=window, chunk=chunk, rank=rank, sinks=0)
    cache = hc.HierarchicalKVCache.empty(spec, 2, n, chunk, hy)
    cache = cache.prefill(jnp.asarray(keys, jnp.float32), jnp.asarray(raw, jnp.float32), valid)
    view = hc.dense_view(cache.attention_view())
    err = []
    for row in range(2):
      kept = int(cache.compressed[row]) * chunk
      assert kept == -(-(lengths[row] - hy.ring) // chunk) * chunk > 0
      for lo in range(0, kept, chunk):
        s = np.linalg.svd(raw[0, row, lo:lo + chunk, 0], compute_uv=False)
        tail = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2))
        for got, want in ((view["k"], keys), (view["v"], raw)):
          x = want[0, row, lo:lo + chunk, 0]
          e = np.linalg.norm(np.asarray(got[0, row, hy.ring + lo:hy.ring + lo + chunk, 0]) - x)
          np.testing.assert_allclose(e / np.linalg.norm(x), tail, atol=1e-5, rtol=1e-3)
          err.append(e / np.linalg.norm(x))
    errors.append(max(err))
  assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])) and errors[0] > 0.05
  assert errors[-1] < 1e-5  # rank = chunk >= the rank of any chunk: exact.


# --- Decoding audits. ---

BLOCK = 8


def test_a_lossy_hierarchy_decodes_like_the_full_cache_while_its_ring_holds_the_context(
    tiny_decoder):
  # Rank 1 would change the logits of anything read from the bank (see
  # test_low_rank_decoding_differs_...), but rows of at most 32 positions never leave a
  # ring of 32, while the canvas of 64 makes every decoder build the hierarchical cache.
  model, tok, params = tiny_decoder
  hy = hc.Hierarchy(window=3, chunk=BLOCK, rank=1, sinks=0)
  spec = logits_lib.as_logits_fn(model).kv_spec
  assert isinstance(hc.empty_cache(spec, 2, 64, BLOCK, hierarchy=hy), hc.HierarchicalKVCache)
  prompts = [np.asarray(layout.parse(tok, p).ids, np.int32)
             for p in ("<|bos|>a longer one", "<|bos|>hi")]
  block_opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                                    policy=policies.Threshold(0.05), stop_at_eos=False)
  cv = layout.generation_canvas(prompts, 12, BLOCK, tok.mask_id, 64, 64)
  assert cv.length.max() <= hy.ring
  want = decoder.decode(model, params, cv, block_opt)
  got = decoder.decode(model, params, cv, dataclasses.replace(block_opt, kv_hierarchy=hy))
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_array_equal(got["nfe"], want["nfe"])
  one = decoder.DecodeOptions(block_size=1, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True, stop_at_eos=False)
  cv1 = layout.generation_canvas(prompts, 12, 1, tok.mask_id, 64, 64)
  lossy = dataclasses.replace(one, kv_hierarchy=hy)
  want = ar.decode_ar(model, params, cv1, one)["tokens"]
  np.testing.assert_array_equal(ar.decode_ar(model, params, cv1, lossy)["tokens"], want)
  np.testing.assert_array_equal(isd.decode_isd(model, params, cv1, lossy, stride=4)["tokens"],
                                want)


def _summary_model():
  c = small_model_config()
  c.diffusion.block_size = BLOCK
  c.model.summary.num_slots = 2
  c.model.summary.window_blocks = 1
  model, tok = build.build_model(c)
  return model, tok, build.init_params(model, 0)


def test_summary_slots_are_written_once_at_commit_at_their_blocks_last_position():
  model, tok, params = _summary_model()
  fn = logits_lib.as_logits_fn(model)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 200, n).astype(np.int32) for n in (19, 5)]  # Rows apart.
  cv = layout.generation_canvas(prompts, 21, BLOCK, tok.mask_id, 48, 48)
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), stop_at_eos=False)
  width = state_lib.prefill_width(cv, BLOCK)
  st = jax.jit(lambda p: state_lib.init_state(fn, p, cv, opt, width))(params)
  step = jax.jit(lambda p, s: step_lib.denoise_step(fn, p, s, opt)[0])
  slots = model.cfg.summary.num_slots
  seen = np.asarray(st.summaries.valid)
  frozen = jax.device_get(st.summaries)
  for _ in range(200):
    if bool(np.asarray(st.rows.done).all()):
      break
    st = step(params, st)
    bank = jax.device_get(st.summaries)
    # A slot, once valid, is never rewritten (bit for bit).
    for name in ("k", "v"):
      old, new = getattr(frozen, name), getattr(bank, name)
      np.testing.assert_array_equal(np.where(seen[None, :, :, None, None], new, 0),
                                    np.where(seen[None, :, :, None, None], old, 0))
    np.testing.assert_array_equal(np.where(seen, bank.positions, 0),
                                  np.where(seen, frozen.positions, 0))
    # New slots belong to blocks the row has left behind.
    new_blocks = np.nonzero(bank.valid & ~seen)
    assert (new_blocks[1] // slots < np.asarray(st.rows.block)[new_blocks[0]]).all()
    seen, frozen = bank.valid, bank
  assert bool(np.asarray(st.rows.done).all())
  blocks = np.arange(seen.shape[1]) // slots
  np.testing.assert_array_equal(np.where(seen, frozen.positions, -1),
                                np.where(seen, blocks * BLOCK + BLOCK - 1, -1))
  np.testing.assert_array_equal(np.where(seen, frozen.block_ids, -1), np.where(seen, blocks, -1))
  # Every block before a row's last is summarised, and the slots equal those of one
  # cache-free clean forward over the final tokens.
  length = np.asarray(cv.length)
  assert all(seen[r, :(length[r] // BLOCK - 1) * slots].all() for r in range(2))
  pos = np.broadcast_to(np.arange(48), (2, 48))
  meta = masks.make_meta(pos, BLOCK, masks.CLEAN, np.where(pos < length[:, None], 0, -1))
  sk, sv = jax.jit(lambda p, t: model.apply({"params": p}, t, meta, return_kv=True,
                                            summary="clean")[1]["summary_kv"])(params, st.tokens)
  mask = seen[None, :, :, None, None]
  np.testing.assert_allclose(np.where(mask, frozen.k, 0), np.where(mask, sk, 0), atol=3e-5)
  np.testing.assert_allclose(np.where(mask, frozen.v, 0), np.where(mask, sv, 0), atol=3e-5)
