"""Fresh LoRA adapters without a whole-model init, and the bits/byte scale of long-context
rows that score their prompt."""

import flax
import jax
import numpy as np
import pytest

from conftest import load_config_file
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.data import long_context as lc
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import tokenizers
from blockdiff_jax.model import build
from blockdiff_jax.model import lora
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib

SEED = 7


def _config(lora_rank: int, scan_layers: bool):
  c = load_config_file("tiny")
  c.seed = SEED
  c.data.max_bytes = 40_000
  c.data.seq_len = 32
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.moe.expert_dim = 32
  c.model.scan_layers = scan_layers
  if lora_rank:
    c.model.lora.rank = lora_rank
    c.model.lora.gated = False
  return c


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fresh_adapters_match_a_full_init_without_computing_the_base_weights(
    tmp_path, monkeypatch, scan_layers):
  """LoRA started from a run without adapters (init_from): the adapters are bit for bit
  those of ``build.init_params`` (the old way), and no jitted computation made while
  starting outputs more than the adapters (the old way output the whole fp32 model on
  device 0, next to the restored weights) or needs the base weights' memory."""
  plain = _config(0, scan_layers)
  _, plain_model, _ = initial.build_model(plain, None)
  source = build.init_params(plain_model, seed=3)
  state = state_lib.create(source, optimizer.make_optimizer(plain.train), use_ema=False)
  ckpt = checkpoints.Checkpointer(f"{tmp_path}/checkpoints", use_async=False)
  ckpt.save(1, state, {})
  ckpt.close()

  c = _config(2, scan_layers)
  c.init_from.workdir = str(tmp_path)
  c, model, _ = initial.build_model(c, None)
  want = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
      build.init_params(model, SEED)).items() if lora.is_lora_path(k)}
  base_bytes = _nbytes(source)
  assert want and _nbytes(list(want.values())) < base_bytes / 4

  jitted = []  # (function, args) of every jitted call made while starting.
  real_jit = jax.jit

  def recording_jit(fun, *args, **kwargs):
    compiled = real_jit(fun, *args, **kwargs)

    def call(*a, **k):
      jitted.append((compiled, a, k))
      return compiled(*a, **k)
    return call
  monkeypatch.setattr(jax, "jit", recording_jit)
  params = initial.initial_params(c, model, None)
  monkeypatch.setattr(jax, "jit", real_jit)

  flat = flax.traverse_util.flatten_dict(params)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg="/".join(path))
  for path, value in flax.traverse_util.flatten_dict(source).items():
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value))
  assert jitted
  for compiled, a, k in jitted:
    out = jax.eval_shape(compiled, *a, **k)
    assert _nbytes(out) <= _nbytes(list(want.values())), jax.tree.map(np.shape, out)
    # XLA dropped the base weights' init: its buffers need less than the base weights.
    mem = compiled.lower(*a, **k).compile().memory_analysis()
    if mem is not None:
      assert mem.temp_size_in_bytes + mem.output_size_in_bytes < base_bytes / 2


# ------------------------------------------------------- long-context bits/byte scale


@pytest.fixture(scope="module")
def bpe_tok():
  # Trained on the haystack: several bytes of prose per token, the answers' digits and
  # hex keys about one each.
  return tokenizers.train_bpe([lc.haystack_text(60_000)], vocab_size=600)


def _hand_stats(ds, n):
  """(bytes/token, unigram entropy) of the non-special tokens a row's loss mask scores,
  counted from the rows; their bytes are the decoding of those tokens."""
  tok, num_bytes, scored = ds.tokenizer, 0, []
  for j in range(n):
    tokens, mask = ds.row(j)
    ids = tokens[(mask > 0) & ~np.isin(tokens, tok.special_ids)]
    num_bytes += len(tok.decode(ids).encode("utf-8"))
    scored.append(ids)
  scored = np.concatenate(scored)
  p = np.unique(scored, return_counts=True)[1] / len(scored)
  return num_bytes / len(scored), float(-(p * np.log2(p)).sum()), len(scored)


@pytest.mark.parametrize("score_prompt", [False, True])
def test_long_context_stats_measure_the_scored_tokens(bpe_tok, score_prompt):
  ds = pipeline.LongContextDataset(lc.TASKS, bpe_tok, 256, 2, 16, score_prompt=score_prompt)
  ds.STATS_EXAMPLES = 12  # pylint: disable=invalid-name
  bpt, entropy, num_tokens = _hand_stats(ds, 12)
  stats = ds.stats
  assert stats.num_tokens == num_tokens
  # Decoding prompt and answer together may join a split character: a byte or two.
  assert stats.bytes_per_token == pytest.approx(bpt, rel=1e-3)
  assert stats.unigram_entropy_bits == pytest.approx(entropy, rel=1e-9)
  answers = _hand_stats(pipeline.LongContextDataset(lc.TASKS, bpe_tok, 256, 2, 16), 12)[0]
  # The tokenizer scales prose and answers differently: the check can tell them apart.
  assert (bpt > 1.5 * answers) == score_prompt
