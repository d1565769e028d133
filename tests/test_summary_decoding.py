"""Block decoding of a model with ChatDLM summary tokens: the summary bank and the summary-form
hierarchical cache against a slow reference built on the BD3 training forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import build
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

BLOCK = 8
PROMPT_LEN = (37, 21)  # Mid-block prompt ends: the start block mixes prompt and MASKs.
MAX_NEW = 27  # Rows end on block boundaries (64 and 48 tokens), as the reference assumes.
WIDTH = 64


_MODELS = {}


def _summary_model(window):
  """A tiny random model with 2 summary slots per block and a window of ``window`` blocks."""
  if window not in _MODELS:
    c = small_model_config()
    c.diffusion.block_size = BLOCK
    c.model.summary.num_slots = 2
    c.model.summary.window_blocks = window
    model, tok = build.build_model(c)
    _MODELS[window] = model, tok, build.init_params(model, 0), window
  return _MODELS[window]


@pytest.fixture(params=[1, 2], ids=["W1", "W2"])
def summary_model(request):
  return _summary_model(request.param)


@pytest.fixture
def summary_model_w2():
  return _summary_model(2)


def _canvas(tok):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 200, n).astype(np.int32) for n in PROMPT_LEN]
  return layout.generation_canvas(prompts, MAX_NEW, BLOCK, tok.mask_id, WIDTH, WIDTH)


def _policy_step(opt, x, logits, region):
  logits = jnp.asarray(logits).at[..., opt.mask_id].set(-1e30)
  toks, conf, probs = opt.sampling.propose(logits[None], jax.random.key(0))
  entropy, margin = policies.scores(probs)
  cand = (jnp.asarray(x) == opt.mask_id)[None] & jnp.asarray(region)[None]
  accept = opt.policy.select(conf, entropy, margin, cand, jnp.sum(region)[None, None])
  return np.where(np.asarray(accept)[0], np.asarray(toks)[0], x)


def _reference(model, params, opt, tokens, maskable, start, length):
  """One row, no cache: each step is the BD3 training forward ``[x_t ; x_0]`` with summary
  slots, x_0 holding the committed blocks and x_t the block being denoised."""
  toks = tokens.copy()
  fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, summary="bd3")[0])
  for c in range(start, length // BLOCK):
    lo, hi = c * BLOCK, (c + 1) * BLOCK
    region = maskable[lo:hi]
    while (toks[lo:hi][region] == opt.mask_id).any():
      x_t = np.concatenate([np.full(lo, opt.mask_id, np.int32), toks[lo:hi]])
      x_0 = np.concatenate([toks[:lo], np.full(BLOCK, opt.mask_id, np.int32)])
      logits = fwd(params, jnp.asarray(np.concatenate([x_t, x_0]))[None],
                   masks.training_meta(hi, BLOCK))
      toks[lo:hi] = _policy_step(opt, toks[lo:hi], np.asarray(logits[0, lo:hi]), region)
  return toks


def test_summary_model_decodes_like_its_training_forward(summary_model):
  model, tok, params, window = summary_model
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), stop_at_eos=False)
  cv = _canvas(tok)
  full = decoder.decode(model, params, cv, opt)
  for i in range(len(PROMPT_LEN)):
    want = _reference(model, params, opt, cv.tokens[i], cv.maskable[i],
                      int(cv.start_block[i]), int(cv.length[i]))
    np.testing.assert_array_equal(full["tokens"][i], want)
  # The summary form keeps only a ring of W + 1 blocks (older blocks live on as their
  # slots) and decodes the same tokens.
  hier = dataclasses.replace(opt, kv_hierarchy=hc.Hierarchy(window=window, chunk=BLOCK,
                                                            form="summary"))
  got = decoder.decode(model, params, cv, hier)
  np.testing.assert_array_equal(got["tokens"], full["tokens"])
  np.testing.assert_array_equal(got["nfe"], full["nfe"])
  full_bytes = hc.cache_bytes(model_kv_spec(model), 1, WIDTH)
  assert hc.cache_bytes(model_kv_spec(model), 1, WIDTH, hier.kv_hierarchy) < full_bytes / 2


def test_summary_slots_change_the_answer(summary_model_w2):
  """The bank is read: scaling the learned slot embeddings changes what is decoded."""
  model, tok, params, _ = summary_model_w2
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              policy=policies.Threshold(0.05), stop_at_eos=False)
  cv = _canvas(tok)
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 25.0 if "summary_embed" in jax.tree_util.keystr(path) else x, params)
  a = decoder.decode(model, params, cv, opt)["tokens"]
  b = decoder.decode(model, scaled, cv, opt)["tokens"]
  assert (a != b).any()


def test_summary_form_needs_a_summary_model_and_the_block_decoder(summary_model_w2):
  model, tok, params, _ = summary_model_w2
  opt = decoder.DecodeOptions(block_size=BLOCK, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True,
                              kv_hierarchy=hc.Hierarchy(window=1, chunk=BLOCK, form="summary"))
  cv = layout.generation_canvas([np.arange(3, 12, dtype=np.int32)], 8, 1, tok.mask_id, 32)
  with pytest.raises(ValueError, match="summary.*block decoder"):
    ar.decode_ar(model, params, cv, opt)
  plain, _ = build.build_model(small_model_config())
  with pytest.raises(ValueError, match="needs a model with summary tokens"):
    decoder.decode(plain, build.init_params(plain, 0), _canvas(tok),
                   dataclasses.replace(opt, token_shift=False))
  with pytest.raises(ValueError, match="does not cover the model's summary window of 2"):
    decoder.decode(model, params, _canvas(tok), dataclasses.replace(opt, token_shift=False))
  with pytest.raises(ValueError, match="form must be"):
    hc.Hierarchy(form="svd")


def model_kv_spec(model):
  from blockdiff_jax.sampling import logits as logits_lib  # pylint: disable=g-import-not-at-top
  return logits_lib.as_logits_fn(model).kv_spec


def test_summary_bank_and_summary_form_bytes_match_kv_memory():
  from blockdiff_jax.model import kv_memory  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import kv_cache  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import summary_bank  # pylint: disable=g-import-not-at-top
  spec = kv_cache.KVSpec(4, 2, 32, jnp.bfloat16)
  shapes = jax.eval_shape(lambda: summary_bank.SummaryBank.empty(spec, 3, 4096 // 64, 4))
  got = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
  assert got == kv_memory.summary_bank_bytes(4, 2, 32, jnp.bfloat16, 3, 4096, 64, 4)
  hy = hc.Hierarchy(window=2, chunk=64, form="summary")
  assert hc.cache_bytes(spec, 3, 4096, hy) == kv_memory.hierarchical_cache_bytes(
      4, 2, 32, jnp.bfloat16, 3, 4096, 2, 64, hy.rank, hy.sinks, form="summary")
  # Ring of 3 x 64 exact positions + 4 slots per block of 64 against 4096 positions.
  full = hc.cache_bytes(spec, 3, 4096)
  bank = kv_memory.summary_bank_bytes(4, 2, 32, jnp.bfloat16, 3, 4096, 64, 4)
  assert (hc.cache_bytes(spec, 3, 4096, hy) + bank) / full < 0.15


def test_plan_counts_the_summary_form():
  from blockdiff_jax.train import plan  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.summary.num_slots = 2
  c.model.summary.window_blocks = 1
  c.diffusion.block_size = 32  # S / B = 1/16 of the positions are kept, as slots.
  c.model.vocab_size = 256
  c.sample.max_len = 131072
  c.sample.kv_form, c.sample.kv_window, c.sample.kv_chunk = "summary", 1, c.diffusion.block_size
  dc = plan.plan(c, num_devices=1)["decode_cache"]
  assert dc["hierarchy"]["form"] == "summary"
  assert dc["hierarchical"] / dc["full"] < 0.15
  assert "summary form" in plan.format_table(plan.plan(c, num_devices=1))
