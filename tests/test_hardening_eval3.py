"""Hardening of evaluation bookkeeping: what is reported is what was asked and measured.

Covers pass@k with no usable k (refused before any sample is drawn or run), the routing
sweep's NELBO against a slow split-wide per-token reference, ``eval`` fields that used
to fail only once their task ran (or scored every sample as an error), and the strict
JSON of ``metrics.jsonl`` with its non-finite values read back.
"""

import contextlib
import glob
import json
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax import metrics_writer
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import eval_config
from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import pass_at_k
from blockdiff_jax.evaluation import routing_sweep
from blockdiff_jax.evaluation import sandbox
from blockdiff_jax.model import build
from blockdiff_jax.model import moe as moe_lib
from blockdiff_jax.model import transformer
from conftest import load_config_file


def _strict_loads(text):
  """json.loads that refuses the NaN / Infinity tokens, as jq and JSON.parse do."""
  def refuse(token):
    raise ValueError(f"not strict JSON: {token}")
  return json.loads(text, parse_constant=refuse)


# pass@k with no usable k.


def test_pass_at_k_with_no_usable_k_is_refused_before_any_sample_is_drawn_or_run(
    monkeypatch, tmp_path, capsys):
  with pytest.raises(ValueError, match=r"ks=\[5, 10\].*1, the fewest samples"):
    pass_at_k.mean_pass_at_k([(1, 1), (3, 2)], [5, 10])
  # A usable k still skips the others, as documented.
  assert pass_at_k.mean_pass_at_k([(1, 1), (3, 2)], [1, 5]) == {
      "pass@1": pytest.approx((1 + 2 / 3) / 2)}

  problems = dict(list(humaneval.load_problems().items())[:2])
  ran, drawn = [], []
  monkeypatch.setattr(humaneval, "check_completion",
                      lambda *a, **kw: ran.append(a) or sandbox.Result(
                          "passed", 0, "", "", 0.0, "", (), None))
  samples = [{"task_id": t, "completion": ""} for t in problems]
  with pytest.raises(ValueError, match=r"no k in ks=\[5\]"):
    humaneval.score_samples(samples, problems, ks=[5], workers=1)
  with pytest.raises(ValueError, match=r"integer >= 1, got ks=\[0, 1\]"):
    humaneval.score_samples(samples, problems, ks=[0, 1], workers=1)
  with pytest.raises(ValueError, match=r"no k in ks=\[2\]"):
    humaneval.generate_and_score(lambda ps: drawn.extend(ps) or [""] * len(ps), problems,
                                 num_samples=1, ks=[2], workers=1, progress=None)
  assert not ran and not drawn
  # The CLI says so and fails, rather than print an empty table and exit 0.
  path = tmp_path / "samples.jsonl"
  path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n")
  assert humaneval.main(["--samples", str(path), "--k", "5", "--problems", "0"]) == 2
  assert "no k in ks=[5]" in capsys.readouterr().err
  assert not ran and not os.path.exists(str(path) + "_summary.json")


# The routing sweep's NELBO.

E, K, BLOCK, LENGTH, VOCAB, DRAWS, SEED = 4, 2, 4, 16, 20, 2, 5


@pytest.fixture(scope="module")
def tiny_moe():
  cfg = transformer.TransformerConfig(
      vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
      mlp_dim=16, moe=moe_lib.MoEConfig(num_experts=E, top_k=K, expert_dim=16, impl="dense",
                                        block_min_experts=K))
  model = transformer.Transformer(cfg)
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  # Jitted: an eager init of the MoE layer dispatches op by op, several times slower.
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), meta)
  return model, nn.unbox(params["params"])


def test_routing_sweep_nelbo_is_per_scored_token_of_the_whole_split(tiny_moe):
  """Batches scoring 32, 3 and 0 tokens: the sweep reports sum(nats) / sum(tokens).

  Reference: the per-token terms of every batch and draw, summed in a slow loop under the
  same noise keys (what ``likelihood.evaluate`` reports). A mean of per-batch ratios
  weighs the 3-token batch like the 32-token one and counts the empty batch as 0 nats.
  """
  model, params = tiny_moe
  rng = np.random.default_rng(0)
  partial = np.zeros((2, LENGTH), np.float32)
  partial[0, :3] = 1.0
  batches = [{"tokens": jnp.asarray(rng.integers(0, VOCAB - 1, (2, LENGTH)), jnp.int32),
              "loss_mask": jnp.asarray(m)}
             for m in (np.ones((2, LENGTH), np.float32), partial, np.zeros((2, LENGTH)))]
  obj = losses.BlockDiffusionObjective(block_size=BLOCK, mask_id=VOCAB - 1)
  got = routing_sweep.evaluate_setting(model, params, batches, obj,
                                       routing_sweep.RoutingSetting("token"), seed=SEED,
                                       noise_samples=DRAWS)

  apply_fn, eval_obj = build.make_apply(model), likelihood.evaluation_objective(obj)
  terms_of = jax.jit(lambda b, r: losses.per_token_nelbo(apply_fn, params, b, r, eval_obj))
  nats = nll_masked = correct = masked = tokens = 0.0
  for i, batch in enumerate(batches):
    tokens += float(np.sum(np.asarray(batch["loss_mask"]) > 0))
    for s in range(DRAWS):
      terms = terms_of(batch, jax.random.fold_in(jax.random.key(SEED), i * DRAWS + s))
      sel = np.asarray(terms.is_masked)
      nats += float(np.sum(np.asarray(terms.nll * terms.weight)[sel])) / DRAWS
      nll_masked += float(np.sum(np.asarray(terms.nll)[sel]))
      correct += float(np.sum(np.asarray(terms.correct)[sel]))
      masked += float(np.sum(sel))
  assert got["nelbo"] == pytest.approx(nats / tokens, rel=1e-5)
  assert got["masked_ce"] == pytest.approx(nll_masked / masked, rel=1e-5)
  assert got["masked_accuracy"] == pytest.approx(correct / masked, rel=1e-5)
  assert got["forwards"] == len(batches) * DRAWS


# eval fields refused before the model loads.


@pytest.mark.parametrize("field,value", [
    ("long_context_seed", -1), ("long_context_seed", 1_000_000), ("timeout_s", math.inf),
    ("infilling_kinds", "single-line,middle"), ("decoders", "thresh:0.9"),
    ("decoders", "threshold:1.5"), ("decoders", "threshold:high")])
def test_eval_fields_that_failed_late_are_named_before_the_model_loads(field, value,
                                                                        monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("the model was loaded before the config was checked")

  monkeypatch.setattr(inference, "load_for_inference", never)
  c = load_config_file("tiny")
  c.eval.tasks = "humaneval,humaneval_infilling,long_context"
  c.eval[field] = value
  with pytest.raises(ValueError, match=f"eval.{field}"):
    evaluate.run(c, "/nonexistent")


def test_an_infinite_sandbox_timeout_is_refused_not_scored_as_errors():
  # Before: accepted, and int(inf) in the CPU rlimit made every program an "error".
  for bad in (math.inf, math.nan):
    with pytest.raises(ValueError, match="timeout_s must be a finite number > 0"):
      sandbox.SandboxLimits(timeout_s=bad)
  ok = sandbox.run_program("x = 1", limits=sandbox.SandboxLimits(timeout_s=1e6))
  assert ok.status == "passed", ok


def test_int_lists_with_a_trailing_comma_are_read_as_validated(monkeypatch):
  """``eval.ks="1,"`` and ``long_context_lengths="64,"`` pass validation; the tasks read
  them the same way instead of failing on int("") once the model is loaded."""
  c = load_config_file("tiny")
  c.eval.update(ks="1,", long_context_lengths="64,", humaneval_problems=1,
                decoders="threshold:0.9")
  eval_config.validate(c.eval)
  assert eval_config.long_context_lengths(c) == [64]
  asked = []

  def fake_score(generate_fn, problems, ks, **kwargs):
    asked.append(list(ks))
    return {"pass_at_k": {}, "num_problems": len(problems), "status_counts": {}}
  monkeypatch.setattr(humaneval, "generate_and_score", fake_score)
  evaluate.task_humaneval(types.SimpleNamespace(config=c))
  assert asked == [[1]]


# Strict JSON in metrics.jsonl.


def test_metrics_rows_are_strict_json_and_read_back_with_their_non_finite_values(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False)
  returned = writer.write(3, {"loss": np.float32(1.5), "nan": np.nan, "inf": np.inf,
                              "neg": -np.inf})
  writer.close()
  assert math.isnan(returned["nan"]) and returned["inf"] == math.inf  # For the console.
  (line,) = open(tmp_path / "metrics.jsonl", encoding="utf-8").readlines()
  row = _strict_loads(line)
  assert row["loss"] == 1.5 and row["nan"] is None and row["inf"] is None
  (back,) = metrics_writer.read_rows(str(tmp_path / "metrics.jsonl"))
  assert set(back) == {"step", "loss", "nan", "inf", "neg"}
  assert math.isnan(back["nan"]) and back["inf"] == math.inf and back["neg"] == -math.inf
  # Files written before (bare NaN tokens) still read, and resuming keeps such rows.
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "loss": NaN}\n')
  assert math.isnan(metrics_writer.read_rows(str(tmp_path / "metrics.jsonl"))[1]["loss"])
  assert metrics_writer.truncate_rows(str(tmp_path / "metrics.jsonl"), 4) == 0


def test_eval_writes_strict_json_when_a_result_is_not_finite(monkeypatch, tmp_path):
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda workdir, config: (config, None, None, None))
  monkeypatch.setattr(inference, "inference_context", lambda config: contextlib.nullcontext())
  monkeypatch.setitem(evaluate.TASK_FNS, "throughput", lambda ev: {
      "decoders": {"ar": {"tokens_per_s": float("nan"), "generated_tokens": 0}}})
  c = load_config_file("tiny")
  c.eval.tasks = "throughput"
  evaluate.run(c, str(tmp_path))
  (path,) = glob.glob(os.path.join(tmp_path, "eval", "*.json"))
  assert _strict_loads(open(path).read())["throughput"]["decoders"]["ar"]["tokens_per_s"] is None
  lines = open(tmp_path / "metrics.jsonl", encoding="utf-8").readlines()
  assert _strict_loads(lines[-1])["eval/throughput/decoders/ar/tokens_per_s"] is None
  row = metrics_writer.read_rows(str(tmp_path / "metrics.jsonl"))[-1]
  assert math.isnan(row["eval/throughput/decoders/ar/tokens_per_s"])


# ---------------------------------------------- synthetic prompts in the trained format


def _chatml_byte_bpe(interop_tokenizer):
  """A pretrained-style tokenizer in milliseconds: byte-level BPE without merges, ChatML
  specials, no chat template (so it renders ChatML, as Qwen's does)."""
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  table = hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(
      vocab={c: i for i, c in enumerate(sorted(table))}, merges=[]))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  end = tok.token_to_id("<|endoftext|>")
  return interop_tokenizer.PretrainedTokenizer(tok, end, tok.token_to_id("<|im_end|>"), end)


@pytest.mark.parametrize("vocab", ["byte", "chatml"])
def test_synthetic_eval_prompts_are_the_heads_the_synthetic_sft_source_trains_on(vocab):
  """A chat model fine-tuned on ``sft_source=synthetic`` learnt its chat-template user
  turn; the eval task asked it ``<|bos|>prompt<|sep|>`` instead."""
  from blockdiff_jax.data import sft  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import tokenizer as interop_tokenizer  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
  tok = tokenizers.ByteTokenizer() if vocab == "byte" else _chatml_byte_bpe(interop_tokenizer)
  config = load_config_file("synthetic")
  tasks, raw, heads = evaluate.synthetic_prompts(config, tok, 4)
  assert len(set(tasks)) > 1 and len(raw) == len(heads) == 4
  for prompt, head in zip(raw, heads):
    want = sft.render(tok, (prompt, ""))[0]  # What training put before the answer.
    np.testing.assert_array_equal(layout.parse(tok, head).ids, want)
