"""Hardening of the long-context evaluation and task generators (helper longctx2).

Covers: ``cache_fidelity`` with a hierarchy whose ring holds the whole prefix (the
decoders then keep the full cache) and with a summary-token model (whose one-block-per-
token forward would read neither cache's context); ``make_example``'s arguments that seed
its generator; retrieval scoring against a fake model that says a known completion.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_model_config
from blockdiff_jax.data import long_context as tasks
from blockdiff_jax.data import tokenizers
from blockdiff_jax.evaluation import long_context as lc_eval
from blockdiff_jax.model import build
from blockdiff_jax.sampling import hierarchical_cache as hc
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

_TOKENS = (np.arange(40) * 7) % 200 + 3  # 32 cached positions, 8 queries.


@pytest.fixture(scope="module")
def plain_model():
  model, _ = build.build_model(small_model_config())
  return model, build.init_params(model, 0)


def test_fidelity_of_a_ring_holding_the_whole_prefix_is_exact(plain_model):
  """A ring of 5 x 8 >= 32 cached positions compresses nothing: the decoders keep the full
  cache, and the measurement must say so (it used to raise AttributeError, losing the
  other hierarchies' numbers of the same call too)."""
  model, params = plain_model
  lossy = hc.Hierarchy(window=1, chunk=8, rank=1, sinks=0)
  exact_ring = hc.Hierarchy(window=4, chunk=8, rank=2)
  got_lossy, got_exact = lc_eval.cache_fidelity(model, params, _TOKENS, 32,
                                                [lossy, exact_ring])
  assert got_exact.kl == pytest.approx(0.0, abs=1e-6) and got_exact.kl_max < 1e-5
  assert got_exact.top1_agreement == 1.0 and got_exact.compressed_fraction == 0.0
  # The lossy one beside it: ceil((32 - 16) / 8) = 2 of 4 chunks factorised, no sinks.
  assert got_lossy.compressed_fraction == 0.5 and got_lossy.kl > 1e-3


def test_fidelity_refuses_a_summary_model():
  """Its causal forward gives each token a block, so a summary model would read only its
  last window_blocks tokens through both caches: KL 0 whatever the compression."""
  c = small_model_config()
  c.diffusion.block_size = 4
  c.model.summary.num_slots, c.model.summary.window_blocks = 2, 1
  model, _ = build.build_model(c)
  with pytest.raises(ValueError, match="summary tokens.*decoder='block'"):
    lc_eval.cache_fidelity(model, build.init_params(model, 0), _TOKENS, 32,
                           [hc.Hierarchy(window=1, chunk=8, rank=1, sinks=0)])


@pytest.fixture(scope="module")
def byte_tok_and_haystack():
  tok = tokenizers.ByteTokenizer()
  return tok, tasks.load_haystack(tok, 4096)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(index=-2), "index must be an integer >= 0, got -2"),
    (dict(length=600.0), "length must be an integer >= 1, got 600.0"),
])
def test_make_example_names_a_bad_generator_argument(byte_tok_and_haystack, kwargs, match):
  # numpy's own errors named neither: "expected non-negative integer", and a float
  # length gave "TypeError: seed must be integer".
  tok, hay = byte_tok_and_haystack
  with pytest.raises(ValueError, match=match):
    tasks.make_example("passkey", tok, hay, **(dict(length=600, depth=0.5) | kwargs))
  ex = tasks.make_example("passkey", tok, hay, length=np.int64(600), depth=0.5,
                          seed=np.int64(3))
  assert len(ex.prompt_ids) == 600


@dataclasses.dataclass(frozen=True, eq=False)
class _Sayer:
  """A logits function that predicts ``table[p + 1]`` at position p: an AR model that
  knows the prompt and then says a fixed completion."""

  table: tuple
  vocab: int
  kv_spec = kv_cache.KVSpec(1, 1, 2, jnp.float32)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    del params, cache
    nxt = jnp.asarray(self.table, jnp.int32)[
        jnp.clip(meta.positions + 1, 0, len(self.table) - 1)]
    logits = jax.nn.one_hot(nxt, self.vocab) * 10.0
    if logits_slice is not None:
      logits = logits[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    kv = jnp.zeros((1,) + tokens.shape + (1, 2))
    return logits, (kv, kv), {}


@pytest.mark.parametrize("task", tasks.TASKS)
def test_retrieval_scores_what_the_model_says(byte_tok_and_haystack, task):
  tok, hay = byte_tok_and_haystack
  ex = tasks.make_example(task, tok, hay, length=701, depth=0.5)  # 701: not a block multiple.
  opt = layout.DecodeOptions(block_size=1, mask_id=tok.mask_id, eos_id=tok.eos_id,
                             token_shift=True)
  for said, hit in [(f' "{ex.answer}".', True), (ex.answer[:-1] + "x", False)]:
    table = np.concatenate([ex.prompt_ids, tok.encode(said), [tok.eos_id] * 16])
    fake = _Sayer(tuple(int(t) for t in table), tok.vocab_size)
    row, = lc_eval.retrieval(fake, None, tok, [ex], opt, max_new_tokens=12)
    assert row["completion"] == said and row["hit"] is hit
