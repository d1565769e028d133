"""Hardening of the evaluation package (eval6): routing sweeps of every objective, finite
likelihood splits, eval.decoders, interrupted runs."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import routing_sweep
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer
from conftest import evaluate_without_a_model
from conftest import load_config_file

MASK = 15


def _batches():
  """Two batches of different document structure (one vs four documents per row)."""
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % MASK
  return [{"tokens": tokens, "loss_mask": jnp.ones((2, 8)),
           "segment_ids": jnp.zeros((2, 8), jnp.int32)},
          {"tokens": (tokens * 7 + 3) % MASK, "loss_mask": jnp.ones((2, 8)),
           "segment_ids": jnp.broadcast_to(jnp.arange(8) // 2, (2, 8)).astype(jnp.int32)}]


_OBJECTIVES = {
    "ar": (lambda: autoregressive.AutoregressiveObjective(mask_id=MASK),
           "ar_ce", "token_accuracy"),
    "introspective": (lambda: introspective.IntrospectiveObjective(stride=4, mask_id=MASK),
                      "ce_noisy", "noisy_accuracy"),
    "fastdllm": (lambda: fastdllm.FastDLLMObjective(
        block_size=4, mask_id=MASK, schedule=schedules.make_schedule("loglinear", 1e-3),
        noise=schedules.NoiseRange(0.0, 1.0)), "masked_ce", "masked_accuracy"),
}


@pytest.mark.parametrize("kind", sorted(_OBJECTIVES))
def test_routing_sweep_quality_of_every_objective_is_its_token_weighted_loss(tiny_moe, kind):
  """HEAD: KeyError 'masked_fraction' for AR and I-DLM; Fast-dLLM's batches weighed by
  their scored tokens instead of their masked ones (wrong pooled CE)."""
  model, params = tiny_moe
  make, ce_key, acc_key = _OBJECTIVES[kind]
  obj = make()
  batches = _batches()
  res = routing_sweep.evaluate_setting(model, params, batches, obj,
                                       routing_sweep.RoutingSetting("token"), seed=3)
  # Reference: the objective's own loss per batch, pooled by its own token count.
  loss_fn, _ = diffusion_config.loss_functions(obj)
  apply_fn = build.make_apply(model)
  sums = {"nelbo": 0.0, "masked_ce": 0.0, "masked_accuracy": 0.0}
  total = 0.0
  for i, batch in enumerate(batches):
    _, m = loss_fn(apply_fn, params, batch, jax.random.fold_in(jax.random.key(3), i), obj)
    w = float(m["loss_tokens"])
    total += w
    sums["nelbo"] += float(m["nelbo"]) * w
    sums["masked_ce"] += float(m[ce_key]) * w
    sums["masked_accuracy"] += float(m[acc_key]) * w
  for key, value in sums.items():
    assert res[key] == pytest.approx(value / total, rel=1e-4), key
  if kind == "ar":
    # No noisy stream: no noisy block to average over (HEAD, once past the KeyError:
    # 0.0 unique experts per noisy block). Its blocks are single clean tokens, each
    # routed to top_k = 2 distinct experts.
    assert np.isnan(res["unique_experts_noisy_block"]) and np.isnan(res["coreset_noisy_block"])
    assert np.isnan(res["unique_experts_noisy_block_per_layer"]).all()
    assert res["unique_experts_clean_block"] == 2.0
  else:
    assert 2.0 <= res["unique_experts_noisy_block"] <= 4.0


# likelihood.evaluate on a finite split.


def test_likelihood_counts_each_row_of_a_finite_split_once():
  """HEAD: 4 batches of 2 over a 3-window split scored 8 "sequences" (each window 2-3
  times, as independent ones), shrinking the standard error by about sqrt(8 / 3)."""
  tok = tokenizers.ByteTokenizer()
  # Three documents of 6 bytes + BOS + EOS: exactly three windows of 8.
  ds = pipeline.PackedLMDataset(["abcdef", "ghijkl", "mnopqr"], tok, 8, 2, seed=1)
  assert ds.num_windows == 3
  cfg = transformer.TransformerConfig(vocab_size=tok.vocab_size, d_model=16, num_layers=1,
                                      num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=16)
  model = transformer.Transformer(cfg)
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                        meta)["params"])
  apply_fn = build.make_apply(model)
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=tok.mask_id)
  res = likelihood.evaluate(apply_fn, params, ds, obj, 4, 1, bytes_per_token=1.0,
                            special_ids=tok.special_ids)
  # Reference: the split's first three rows (batch 0, and row 0 of batch 1) under the
  # noise draws of their batches.
  eval_obj = likelihood.evaluation_objective(obj)
  nats, scored, rows = [], [], []
  for i, keep in ((0, 2), (1, 1)):
    batch = ds.get_batch(i)
    n, c = likelihood.per_sequence_sums(apply_fn, params, batch,
                                        jax.random.fold_in(jax.random.key(0), i), eval_obj)
    nats += list(np.asarray(n, np.float64)[:keep])
    scored += list(np.asarray(c, np.float64)[:keep])
    rows += [tuple(r) for r in np.asarray(batch["tokens"])[:keep]]
  assert len(set(rows)) == 3  # Every window once.
  per_token = np.array(nats) / np.array(scored)
  assert scored == [7.0] * 3  # Equal lengths: the stderr is the per-token one's.
  assert res["sequences"] == 3 and res["scored_tokens"] == 21
  assert res["nelbo"] == pytest.approx(per_token.mean(), rel=1e-5)
  assert res["nelbo_stderr"] == pytest.approx(per_token.std(ddof=1) / math.sqrt(3), rel=1e-4)


# evaluate: eval.decoders.


def test_a_decoder_named_twice_decodes_once():
  """HEAD: every decoding task ran threshold:0.9 twice (hours on HumanEval) and kept one
  result under the one name ``threshold:0.9``."""
  got = evaluate._parse_decoders("threshold:0.9, threshold:0.90,ar,topk:2,ar")
  assert got == [("threshold", 0.9), ("ar", None), ("topk", 2.0)]
  assert len({evaluate._decoder_name(*d) for d in got}) == len(got)


@pytest.mark.parametrize("spec", ["entropy:nan", "factor:NaN", "threshold:0.9,entropy:nan"])
def test_a_nan_decoder_value_is_refused_naming_the_item(spec):
  # HEAD: accepted (NaN passes "gamma < 0"); entropy:nan then accepts no token by its
  # rule, decoding one token per step under the label entropy:nan.
  with pytest.raises(ValueError, match=r"eval\.decoders: '(entropy|factor):(nan|NaN)'"):
    evaluate._parse_decoders(spec)


# evaluate.run: results of an interrupted run.


def test_ctrl_c_writes_the_finished_tasks_before_stopping(monkeypatch, tmp_path):
  """HEAD: KeyboardInterrupt in the second task went straight up; the first task's
  results (and the second's partial ones) were never written."""
  calls = []
  evaluate_without_a_model(monkeypatch)
  monkeypatch.setitem(evaluate.TASK_FNS, "likelihood",
                      lambda ev: calls.append("likelihood") or {"nelbo": 1.5})

  def interrupted(ev):
    calls.append("synthetic")
    evaluate._track(ev, {"ar": {"exact_match": 0.25}})
    raise KeyboardInterrupt

  monkeypatch.setitem(evaluate.TASK_FNS, "synthetic", interrupted)
  monkeypatch.setitem(evaluate.TASK_FNS, "throughput", lambda ev: calls.append("throughput"))
  c = load_config_file("tiny")
  c.eval.tasks = "likelihood,synthetic,throughput"
  with pytest.raises(KeyboardInterrupt):
    evaluate.run(c, str(tmp_path))
  assert calls == ["likelihood", "synthetic"]  # Stopped: throughput did not run.
  written = list((tmp_path / "eval").glob("eval_*.json"))
  assert len(written) == 1
  res = json.loads(written[0].read_text())
  assert res["likelihood"] == {"nelbo": 1.5}
  assert res["synthetic"]["ar"] == {"exact_match": 0.25}
  assert "KeyboardInterrupt" in res["synthetic"]["error"]
  assert (tmp_path / "eval" / written[0].name.replace(".json", ".md")).exists()
