"""--mode=eval end to end on a tiny trained workdir, and the decoder → scorer wiring."""

import json
import os

import jax
import numpy as np
import pytest

from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.sampling import sample as sample_lib
from blockdiff_jax.train import trainer
from conftest import load_config_file


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  c = load_config_file("tiny")
  c.data.max_bytes = 40_000
  c.train.steps = 2
  c.train.eval_every = 0
  c.train.async_checkpoints = False
  path = str(tmp_path_factory.mktemp("evalrun"))
  trainer.run(c, path)
  return path


def _config(tasks, **eval_overrides):
  c = load_config_file("tiny")
  c.eval.tasks = tasks
  c.eval.num_examples = 4
  c.eval.batch_size = 4
  c.eval.humaneval_problems = 3
  c.eval.max_new_tokens = 8
  c.eval.max_len = 1024
  c.sample.max_new_tokens = 8
  c.eval.update(eval_overrides)
  return c


def test_eval_mode_writes_json_markdown_and_metrics(workdir):
  res = evaluate.run(_config("likelihood,synthetic,throughput"), workdir)
  assert res["likelihood"]["nelbo"] > 0 and res["likelihood"]["nelbo_stderr"] > 0
  assert set(res["synthetic"]) == {"threshold:0.9", "ar"}
  assert 0.0 <= res["synthetic"]["ar"]["exact_match"] <= 1.0
  ar = res["throughput"]["decoders"]["ar"]
  assert ar["tpf"] == pytest.approx(1.0)  # AR: one generated token per forward.
  assert ar["generated_tokens"] == ar["nfe"]
  assert res["throughput"]["unique_experts_block_routing"] <= res["throughput"]["num_experts"]
  files = os.listdir(os.path.join(workdir, "eval"))
  assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert "eval/likelihood/nelbo" in rows[-1]


def test_humaneval_task_scores_what_the_decoder_returns(workdir, monkeypatch):
  problems = humaneval.load_problems()

  def canonical(self, prompts, *args, **kwargs):
    by_prompt = {"<|bos|>" + p["prompt"]: p["canonical_solution"] for p in problems.values()}
    return [{"completion": by_prompt[p]} for p in prompts], {}

  monkeypatch.setattr(evaluate.Evaluator, "generate", canonical)
  res = evaluate.run(_config("humaneval", decoders="threshold:0.9"), workdir)
  assert res["humaneval"]["threshold:0.9"]["pass_at_k"]["pass@1"] == 1.0
  assert res["humaneval"]["threshold:0.9"]["num_problems"] == 3


def test_humaneval_batches_never_share_a_sampling_key(workdir, monkeypatch):
  """generate_and_score calls the decoder once per batch; each call must not restart at
  key 0, or the samples of a problem repeat from batch to batch (pass@k inflated)."""
  calls = []

  def record(model, params, tok, prompts, options, max_new, max_len, width=None, ar=False,
             rng=None, warmup=False, **kwargs):
    calls.append((tuple(jax.random.key_data(rng).tolist()), warmup))
    row = {"completion": "", "generated_tokens": 0, "nfe": 1, "steps_per_block": []}
    return [dict(row) for _ in prompts], {"wall_s": 1.0, "unique_experts": 1.0}

  monkeypatch.setattr(evaluate.sample_lib, "generate", record)
  c = _config("humaneval", decoders="threshold:0.9", humaneval_problems=1, batch_size=2,
              samples_per_problem=6, ks="1,4")
  c.sample.temperature = 1.0
  evaluate.run(c, workdir)
  assert len(calls) == 3  # 6 samples of one problem, 2 per batch.
  assert len({key for key, _ in calls}) == 3
  assert [w for _, w in calls] == [True, False, False]  # Compiled and warmed up once.


def test_prompts_too_long_for_max_len_are_failures_not_fatal(workdir):
  """HumanEval/1 (507 tokens with BOS) cannot fit eval.max_len=420; the others decode.
  420 is not a multiple of the block size (8): the canvas rounds up, the limit stays."""
  res = evaluate.run(_config("humaneval", decoders="threshold:0.9", max_len=420), workdir)
  r = res["humaneval"]["threshold:0.9"]
  assert r["prompts_too_long"] == 1
  assert r["num_problems"] == 3 and sum(r["status_counts"].values()) == 3


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("max_len", -1), ("max_new_tokens", 2048), ("ks", "1,x"),
    ("ks", "2"), ("timeout_s", 0.0), ("infilling_mode", "middle"),
    ("long_context_depths", "0.5,1.5"), ("long_context_lengths", "256,-1"),
    ("samples_per_problem", True), ("long_context_tasks", "passkey,needle")])
def test_bad_eval_fields_are_named_before_the_model_loads(field, value, monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("the model was loaded before the config was checked")

  monkeypatch.setattr(evaluate.inference, "load_for_inference", never)
  c = _config("humaneval,long_context", **{field: value})
  with pytest.raises(ValueError, match=f"eval.{field}"):
    evaluate.run(c, "/nonexistent")


def test_infilling_task_scores_what_the_infiller_returns(workdir, monkeypatch):
  calls = []

  def oracle(model, params, tokenizer, texts, options, max_len, width=None, **unused):
    calls.extend(texts)
    return [{"spans": [""]} for _ in texts]

  monkeypatch.setattr(sample_lib, "infill", oracle)
  res = evaluate.run(_config("humaneval_infilling"), workdir)["humaneval_infilling"]
  assert res["tasks"] == len(calls) > 0
  assert all("<|mask:" in t for t in calls)
  assert res["pass_rate"] == 0.0  # Empty middles fail these three problems' tests.


def test_unknown_task_is_rejected(workdir):
  with pytest.raises(ValueError, match="perplexity"):
    evaluate.run(_config("perplexity"), workdir)


def test_long_context_task_scores_what_retrieval_returns(workdir, monkeypatch):
  from blockdiff_jax.data import long_context as lc  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import long_context  # pylint: disable=g-import-not-at-top
  calls = []

  def oracle(model, params, tok, examples, options, max_new_tokens, decoder, wrap, batch_size,
             **unused):
    calls.append((decoder, wrap, options.kv_hierarchy))
    # Reads the passkey off the prompt; gets half of every key-value answer wrong.
    completion = lambda e: lc.solve(e) if e.task == "passkey" else e.answer[:4] + "zzzz"
    return [{"task": e.task, "length": e.length, "depth": e.depth, "answer": e.answer,
             "completion": completion(e),
             "hit": long_context.answer_matches(completion(e), e.answer)} for e in examples]

  monkeypatch.setattr(long_context, "retrieval", oracle)
  c = _config("long_context", long_context_lengths="600,1200", long_context_per_cell=2,
              long_context_depths="0.0,1.0")
  c.sample.kv_cache, c.sample.kv_chunk = "hierarchical", 64
  res = evaluate.run(c, workdir)["long_context"]
  assert res["lengths"] == [600, 1200]
  assert [d for d, _, _ in calls] == ["block", "ar"]  # eval.decoders: threshold:0.9,ar.
  assert not any(w for _, w, _ in calls)  # A text model reads raw prompts.
  assert all(h is not None and h.chunk == 64 for _, _, h in calls)
  for dec in ("threshold:0.9", "ar"):
    r = res["decoders"][dec]
    assert r["exact_match"] == 0.5
    assert r["by_task"] == {"passkey": 1.0, "kv_recall": 0.0}
    assert r["by_length"] == {"600": 0.5, "1200": 0.5}
    assert r["char_accuracy"] == pytest.approx(0.75)  # Passkeys whole, half of each value.
    assert [x["task"] for x in r["samples"]] == ["passkey"] * 4


def test_infilling_and_long_context_draw_under_sample_seed_and_report_progress(
    workdir, monkeypatch, capsys):
  """Both tasks get their keys from ``sample.seed`` (another seed, other samples; one
  seed, the same keys), and long_context prints a progress line per decoder."""
  from blockdiff_jax.evaluation import long_context  # pylint: disable=g-import-not-at-top
  keys = []

  def infill(model, params, tokenizer, texts, options, max_len, width=None, rng=None):
    keys.append(("infill", np.asarray(jax.random.key_data(rng)).tolist()))
    return [{"spans": [""]} for _ in texts]

  def retrieval(model, params, tok, examples, options, max_new_tokens, decoder, wrap,
                batch_size, rng=None, on_example=None):
    keys.append(("lc", np.asarray(jax.random.key_data(rng)).tolist()))
    rows = [{"task": e.task, "length": e.length, "depth": e.depth, "answer": e.answer,
             "completion": "", "hit": False} for e in examples]
    for i, r in enumerate(rows):
      on_example(i, r)
    return rows

  monkeypatch.setattr(sample_lib, "infill", infill)
  monkeypatch.setattr(long_context, "retrieval", retrieval)
  drawn = {}
  for seed in (0, 1, 1):
    keys.clear()
    c = _config("humaneval_infilling,long_context", decoders="ar",
                long_context_lengths="600", long_context_per_cell=1,
                long_context_depths="0.5")
    c.sample.seed = seed
    evaluate.run(c, workdir)
    drawn.setdefault(seed, []).append(list(keys))
  assert drawn[1][0] == drawn[1][1]  # One seed, the same keys.
  assert {k for k, _ in drawn[0][0]} == {"infill", "lc"}
  assert all(a != b for a, b in zip(drawn[0][0], drawn[1][0]))  # Another, other keys.
  assert "[long_context ar 2/2 100.0%]" in capsys.readouterr().out


def test_synthetic_prompts_longer_than_the_rows_allow_still_decode(workdir):
  """Validation prompts plus max_new_tokens may exceed data.seq_len (configs/synthetic.py:
  up to 38 + 32 tokens in rows of 64); the task widens the canvas instead of failing."""
  c = _config("synthetic", decoders="ar", num_examples=4)
  c.sample.max_new_tokens = c.data.seq_len  # Any prompt + this overflows seq_len.
  res = evaluate.run(c, workdir)["synthetic"]["ar"]
  assert 0.0 <= res["exact_match"] <= 1.0


@pytest.mark.parametrize("shift", [False, True])
def test_eval_decodes_with_the_models_token_shift(shift):
  """A token-shifted model (SmolLM2 adapted by Fast-dLLM v2 or I-DLM) is decoded shifted."""
  from blockdiff_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  c = _config("synthetic")
  c.diffusion.token_shift = shift
  ev = evaluate.Evaluator(c, None, tokenizers.ByteTokenizer(), None)
  for policy, value in (("threshold", 0.9), ("ar", None)):
    assert ev.options(policy, value).token_shift is shift
