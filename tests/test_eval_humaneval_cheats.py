"""Hostile HumanEval completions, run through the real scorer command.

Each completion below is wrong (it never makes `check` return) and used to
score as passed because a pass was "exit code 0". One scorer run holds them
all, next to the canonical solution and `return None` of the same problem, and
each case asserts its own sample's result.
"""

import json
import os
import subprocess
import sys

import pytest

from blockdiff_jax.evaluation import humaneval

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "HumanEval/0"  # has_close_elements(numbers, threshold)

# name -> completion (the text after the prompt's signature and docstring).
CHEATS = {
    "sys_exit_0_in_body": "    import sys\n    sys.exit(0)\n",
    "raise_system_exit_in_body": "    raise SystemExit\n",
    "module_level_sys_exit": "    return True\n\nimport sys\nsys.exit(0)\n",
    "os_exit_0_in_body": "    import os\n    os._exit(0)\n",
    "os_exit_0_in_thread": (
        "    import os, threading\n"
        "    t = threading.Thread(target=os._exit, args=(0,))\n"
        "    t.start()\n    t.join()\n"),
    "os_exit_0_in_atexit_hook": (
        "    import atexit, os\n    atexit.register(os._exit, 0)\n"
        "    return None\n"),
    "os_exit_0_in_excepthook": (
        "    import os, sys\n"
        "    sys.excepthook = lambda *args: os._exit(0)\n    return None\n"),
    "settrace_exits_0_when_check_is_called": (
        "    return None\n\n"
        "import os, sys\n"
        "def _tracer(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == 'check':\n"
        "        os._exit(0)\n"
        "    return None\n"
        "sys.settrace(_tracer)\n"),
    "setprofile_raises_system_exit_on_check": (
        "    return None\n\n"
        "import sys\n"
        "def _profiler(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == 'check':\n"
        "        raise SystemExit(0)\n"
        "sys.setprofile(_profiler)\n"),
    "exit_with_wrong_code": "    import os\n    os._exit(2)\n",
    "builtins_eval_replaced_to_skip_check": (
        "    return None\n\n"
        "import builtins\n"
        "builtins.eval = lambda *args, **kwargs: None\n"
        "builtins.exec = lambda *args, **kwargs: None\n"),
    "runner_globals_rebound": (
        "    return None\n\n"
        "import __main__\n"
        "for name in list(vars(__main__)):\n"
        "    if name.startswith('_') and not name.startswith('__'):\n"
        "        setattr(__main__, name, lambda *args, **kwargs: None)\n"
        "__main__._eval = lambda *args, **kwargs: None\n"),
    "sys_modules_and_os_functions_replaced": (
        "    return None\n\n"
        "import os, sys\n"
        "os.write = lambda fd, data: len(data)\n"
        "os._exit = lambda code=0: None\n"
        "sys.excepthook = lambda *args: None\n"),
    "forged_proof_on_every_fd_then_exit_0": (
        "    import os\n"
        "    for fd in range(3, 256):\n"
        "        try:\n"
        "            os.write(fd, b'0' * 32)\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n"),
    "print_success_then_exit_0": (
        "    print('passed'); import sys; sys.stdout.flush()\n"
        "    import os\n    os._exit(0)\n"),
}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  problems = humaneval.load_problems()
  rows = [{"task_id": TASK, "completion": c, "case": name}
          for name, c in CHEATS.items()]
  rows.append({"task_id": TASK, "case": "canonical",
               "completion": problems[TASK]["canonical_solution"]})
  rows.append({"task_id": TASK, "case": "return_none",
               "completion": "    return None\n"})
  folder = tmp_path_factory.mktemp("cheats")
  samples = folder / "samples.jsonl"
  samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
  proc = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.evaluation.humaneval",
       "--samples", str(samples), "--problems", TASK, "--k", "1",
       "--workers", "2", "--timeout", "10"],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  results = [json.loads(line) for line in
             (folder / "samples.jsonl_results.jsonl").read_text().splitlines()]
  summary = json.loads((folder / "samples.jsonl_summary.json").read_text())
  return {r["case"]: r for r in results}, summary


@pytest.mark.parametrize("case", sorted(CHEATS))
def test_cheat_scores_failed(scored, case):
  result = scored[0][case]
  assert result["passed"] is False, result
  assert result["result"] == "failed", result


def test_honest_samples_in_the_same_run_score_as_before(scored):
  by_case, summary = scored
  assert by_case["canonical"]["passed"] is True
  assert by_case["return_none"]["passed"] is False
  n = len(CHEATS) + 2
  assert summary["per_problem"][TASK] == {
      "n": n, "c": 1, "passed": [False] * len(CHEATS) + [True, False]}
  assert summary["pass_at_k"]["pass@1"] == pytest.approx(1 / n)


def test_early_exit_detail_names_the_missing_return(scored):
  by_case = scored[0]
  assert "before check(has_close_elements) returned" in (
      by_case["os_exit_0_in_thread"]["detail"])
  assert "SystemExit(0)" in by_case["sys_exit_0_in_body"]["detail"]
  assert "forged" in by_case["forged_proof_on_every_fd_then_exit_0"]["detail"]
