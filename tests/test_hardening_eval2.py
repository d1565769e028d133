"""Hardening of the evaluation outputs: what ``--mode=eval`` writes is what was measured.

Covers ``evaluate.run``'s handling of a failing task and of a re-run into the same
output folder, the Markdown table against the JSON file, the per-batch latency of
``Evaluator.generate`` when some prompts are too long to decode, pass@k against exact
fractions, and the held-out NELBO of blocks of 4 against a block-by-block forward.
Except for the NELBO, the model is replaced by fakes: those tests are about bookkeeping.
"""

import contextlib
import glob
import json
import math
import os
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import pass_at_k as pak
from blockdiff_jax.model import transformer
from blockdiff_jax.sampling import sample as sample_lib
from conftest import load_config_file

LIKELIHOOD = {"nelbo": 2.718281828, "nelbo_stderr": 0.0123456, "scored_tokens": 123456,
              "sequences": 7}
THROUGHPUT = {"decoders": {"ar": {"tpf": 1.0, "tokens_per_s": 31.41592,
                                  "generated_tokens": 987654}}}


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
  """``evaluate.run`` on a workdir without a checkpoint: the model load is skipped."""
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda workdir, config: (config, None, None, None))
  monkeypatch.setattr(inference, "inference_context", lambda config: contextlib.nullcontext())
  monkeypatch.setitem(evaluate.TASK_FNS, "likelihood", lambda ev: dict(LIKELIHOOD))
  monkeypatch.setitem(evaluate.TASK_FNS, "throughput", lambda ev: json.loads(
      json.dumps(THROUGHPUT)))

  def run(tasks):
    c = load_config_file("tiny")
    c.eval.tasks = tasks
    return evaluate.run(c, str(tmp_path))
  return run, str(tmp_path)


def _markdown_rows(path):
  """{metric: cell text} of an eval Markdown table."""
  rows = {}
  for line in open(path, encoding="utf-8"):
    if line.startswith("| ") and not line.startswith("| metric"):
      key, value = (cell.strip() for cell in line.strip().strip("|").split(" | ", 1))
      rows[key] = value
  return rows


def _json_leaves(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_json_leaves(v, f"{prefix}/{k}" if prefix else k))
    return out
  return {prefix: tree}


def test_a_failing_task_is_recorded_and_the_other_tasks_are_written(fake_run, monkeypatch):
  run, workdir = fake_run

  def broken(ev):
    raise KeyError("no such split")
  monkeypatch.setitem(evaluate.TASK_FNS, "synthetic", broken)
  with pytest.raises(RuntimeError, match=r"synthetic.*KeyError.*no such split"):
    run("likelihood,synthetic,throughput")
  (json_path,) = glob.glob(os.path.join(workdir, "eval", "*.json"))
  written = json.load(open(json_path, encoding="utf-8"))
  assert written["likelihood"] == LIKELIHOOD
  assert written["throughput"] == THROUGHPUT  # The task after the failure still ran.
  assert written["synthetic"] == {"error": "KeyError: 'no such split'"}

  # The Markdown table holds every JSON leaf: counts exactly, others to 4 digits.
  table = _markdown_rows(json_path[:-len(".json")] + ".md")
  leaves = _json_leaves(written)
  assert set(table) == set(leaves)
  for key, value in leaves.items():
    if isinstance(value, int):
      assert table[key] == str(value), key
    elif isinstance(value, float):
      assert float(table[key]) == pytest.approx(value, rel=5e-4), key
    else:
      assert table[key] == value, key
  metrics = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readlines()[-1])
  assert metrics["eval/likelihood/scored_tokens"] == LIKELIHOOD["scored_tokens"]
  assert metrics["eval/throughput/decoders/ar/tokens_per_s"] == pytest.approx(31.41592)


def test_a_rerun_in_the_same_second_keeps_the_earlier_results(fake_run, monkeypatch):
  run, workdir = fake_run
  monkeypatch.setattr(evaluate.time, "strftime", lambda fmt, *a: "20260101_000000")
  run("likelihood")
  monkeypatch.setitem(evaluate.TASK_FNS, "likelihood", lambda ev: {"nelbo": 9.5})
  run("likelihood")
  nelbos = sorted(json.load(open(p))["likelihood"]["nelbo"]
                  for p in glob.glob(os.path.join(workdir, "eval", "*.json")))
  assert nelbos == [LIKELIHOOD["nelbo"], 9.5]
  assert len(glob.glob(os.path.join(workdir, "eval", "*.md"))) == 2


def test_latency_per_batch_counts_only_the_batches_decoded(monkeypatch):
  c = load_config_file("tiny")
  decode_calls = []

  def fake_generate(model, params, tokenizer, prompts, options, max_new_tokens, max_len,
                    **kwargs):
    decode_calls.append(len(prompts))
    rows = [{"completion": "7", "generated_tokens": 3, "nfe": 2, "steps_per_block": [2]}
            for _ in prompts]
    return rows, {"wall_s": 0.25 * len(decode_calls), "unique_experts": float("nan")}
  monkeypatch.setattr(sample_lib, "generate", fake_generate)
  ev = evaluate.Evaluator(c, None, tokenizers.get_tokenizer(c.data), None)
  fit, too_long = "<|bos|>12+3=", "<|bos|>" + "9" * 100
  prompts = [fit] * 5 + [too_long] * 7
  rows, summary = ev.generate(prompts, "threshold", 0.9, 8, 64, batch_size=4)
  assert decode_calls == [4, 4]  # Two batches decoded (the last padded), none for the rest.
  assert summary["too_long"] == 7 and all("error" in r for r in rows[5:])
  assert summary["latency_s_per_batch"] == pytest.approx((0.25 + 0.5) / len(decode_calls))
  assert summary["tokens_per_s"] == pytest.approx(5 * 3 / 0.75)
  _, none_fit = ev.generate([too_long] * 3, "threshold", 0.9, 8, 64, batch_size=4)
  assert math.isnan(none_fit["latency_s_per_batch"])


def test_pass_at_k_is_exact_to_n_200_and_refuses_non_integers():
  for n in (1, 7, 64, 200):
    for c in sorted({0, 1, n // 3, n - 1, n}):
      for k in sorted({1, 2, n // 2, n} - {0}):
        if k > n:
          continue
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pak.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
  # Problems with different n: the mean of the per-problem estimates, k <= smallest n.
  got = pak.mean_pass_at_k([(3, 1), (200, 17), (10, 10)], [1, 3, 5])
  want = sum(1 - Fraction(math.comb(n - c, 3), math.comb(n, 3))
             for n, c in [(3, 1), (200, 17), (10, 10)]) / 3
  assert list(got) == ["pass@1", "pass@3"]
  assert got["pass@3"] == pytest.approx(float(want), abs=1e-12)
  for bad in [(5, 2, 2.5), (5.0, 2, 1), (True, 1, 1), (5, 1.0, 1)]:
    with pytest.raises(ValueError, match="must be an integer"):
      pak.pass_at_k(*bad)


def test_nelbo_of_blocks_of_four_matches_a_block_by_block_forward():
  """``per_sequence_sums`` against one forward per block for the same noise draw.

  The reference sees block j as the only noisy block after clean blocks < j (later
  positions are empty slots), not the vectorized ``[x_t ; x_0]`` layout; row 2 has an
  unscored tail, which must add neither nats nor tokens.
  """
  mask_id, block, length, rows = 11, 4, 16, 3
  cfg = transformer.TransformerConfig(vocab_size=12, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=16)
  model = transformer.Transformer(cfg)
  # Jitted: an eager init compiles every small op on its own.
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2 * length), jnp.int32),
                                        masks.training_meta(length, block, 1))["params"])
  apply_fn = lambda p, t, m, **kw: model.apply({"params": p}, t, m, **kw)
  obj = likelihood.evaluation_objective(losses.BlockDiffusionObjective(block, mask_id))
  tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, mask_id)
  loss_mask = np.ones((rows, length), np.float32)
  loss_mask[2, 10:] = 0
  batch = {"tokens": tokens, "loss_mask": jnp.asarray(loss_mask)}
  rng = jax.random.key(3)
  nats, scored = jax.device_get(jax.jit(
      lambda p, b, k: likelihood.per_sequence_sums(apply_fn, p, b, k, obj))(params, batch, rng))

  def noise_draw(b, k):
    xt, is_masked, t_tok = losses.corrupt(k, b, obj)
    return xt, is_masked, obj.schedule.loss_weight(t_tok)
  xt, is_masked, weight = jax.device_get(jax.jit(noise_draw)(batch, rng))
  pos = np.broadcast_to(np.arange(length), (rows, length))
  blocks = pos // block
  forward = jax.jit(lambda p, t, m: apply_fn(p, t, m)[0])  # One compile for every block.
  want = np.zeros(rows)
  for j in range(length // block):
    meta = masks.make_meta(pos, block, np.where(blocks == j, masks.NOISY, masks.CLEAN),
                           np.where(blocks <= j, 0, -1))
    inp = np.where(blocks == j, xt, np.where(blocks < j, tokens, 0))
    logits = np.asarray(forward(params, jnp.asarray(inp), meta), np.float64)
    logits[..., mask_id] = -np.inf
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    for r in range(rows):
      for i in range(j * block, (j + 1) * block):
        if is_masked[r, i]:
          want[r] += -logp[r, i, int(tokens[r, i])] * weight[r, i]
  assert not is_masked[2, 10:].any() and is_masked.sum() > 0
  np.testing.assert_allclose(nats, want, rtol=1e-5)
  np.testing.assert_array_equal(scored, loss_mask.sum(-1))
