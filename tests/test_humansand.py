"""Hardening tests for the HumanEval scorer, its sandbox and pass@k (humansand).

Every sandbox limit here is generous (the machine is shared): no test depends on how
fast a program runs.
"""

import json
import os
import re
import signal
import threading
import tracemalloc

import pytest

from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import sandbox

GENEROUS = sandbox.SandboxLimits(timeout_s=60.0)


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


# --- sandbox: limits too large for the kernel or for poll() -------------------


@pytest.mark.parametrize("limits", [
    # poll() takes at most 2**31 - 1 ms (~24.8 days): a longer wall-clock limit raised
    # OverflowError out of run_program, leaving the program running.
    {"timeout_s": 1e7},
    # int(timeout_s) + 1 CPU seconds past 2**63: the launcher's setrlimit overflowed and
    # every sample scored "failed" (as if the program had crashed).
    {"timeout_s": 1e19},
    # RLIMIT_AS = memory_mb << 20 past 2**63: the same, for every sample.
    {"memory_mb": 2 ** 50},
    {"max_file_mb": 2 ** 50},
])
def test_limits_beyond_what_the_kernel_can_hold_mean_unlimited(limits):
  result = sandbox.run_program(
      "x = 1\n", limits=sandbox.SandboxLimits(**{"timeout_s": 60.0, **limits}),
      call="x")
  assert result.status == "passed", result.detail


def test_an_interrupted_wait_kills_the_program(monkeypatch):
  """Ctrl-C (or any error) while run_program waits must not leave the program running."""
  launched = []
  real_launch = sandbox._launch

  def launch(*args, **kwargs):
    proc = real_launch(*args, **kwargs)
    if args[0]["mode"] == "run":  # Not the reaper.
      launched.append(proc)
    return proc

  def interrupted_wait(proc, timeout_s):
    del proc, timeout_s
    raise KeyboardInterrupt

  monkeypatch.setattr(sandbox, "_launch", launch)
  monkeypatch.setattr(sandbox, "_wait_exit", interrupted_wait)
  with pytest.raises(KeyboardInterrupt):
    sandbox.run_program("import time\ntime.sleep(600)\n", limits=GENEROUS)
  program = launched[0]
  try:
    # A process that was killed has exited by now; one left running has not.
    assert program.poll() is not None, "the sandboxed program outlived run_program"
    assert program.returncode == -signal.SIGKILL
  finally:
    if program.poll() is None:
      os.killpg(program.pid, signal.SIGKILL)
      program.wait()


# --- score_samples: stopping, and malformed samples ---------------------------


def test_an_interrupted_scoring_run_stops_instead_of_running_every_sample(
    monkeypatch, problems):
  """A KeyboardInterrupt must end the run, not wait for every queued sample."""
  calls = []
  lock = threading.Lock()

  def check(problem, completion, limits):
    del problem, limits
    with lock:
      calls.append(completion)
    if completion == "interrupt":
      raise KeyboardInterrupt
    threading.Event().wait(0.1)
    return sandbox.Result("passed", 0, "", "", 0.1)

  monkeypatch.setattr(humaneval, "check_completion", check)
  one = {"HumanEval/0": problems["HumanEval/0"]}
  samples = ([{"task_id": "HumanEval/0", "completion": "interrupt"}] +
             [{"task_id": "HumanEval/0", "completion": f"s{i}"} for i in range(30)])
  with pytest.raises(KeyboardInterrupt):
    humaneval.score_samples(samples, one, ks=(1,), workers=1)
  # The worker may have taken the next sample before the interrupt reached the caller.
  assert len(calls) <= 3, f"{len(calls)} of 31 samples ran after the interrupt"


@pytest.mark.parametrize("line, what", [
    (5, "sample 1 is no object"),
    (None, "sample 1 is no object"),
    ({"task_id": ["HumanEval/0"], "completion": ""}, "sample 1: task_id"),
    ({"task_id": "HumanEval/0", "completion": None}, "sample 1: completion"),
    ({"task_id": "HumanEval/0", "completion": ["return 1"]}, "sample 1: completion"),
])
def test_malformed_samples_are_refused_by_index_before_any_sample_runs(
    monkeypatch, problems, line, what):
  ran = []
  monkeypatch.setattr(humaneval, "check_completion",
                      lambda *a, **k: ran.append(a) or sandbox.Result("passed", 0, "",
                                                                      "", 0.0))
  one = {"HumanEval/0": problems["HumanEval/0"]}
  samples = [{"task_id": "HumanEval/0", "completion": "    return False\n"}, line]
  with pytest.raises(ValueError, match=what):
    humaneval.score_samples(samples, one, ks=(1,), workers=1)
  assert not ran


def test_the_cli_reports_a_samples_line_that_is_no_object(tmp_path, capsys):
  path = tmp_path / "samples.jsonl"
  path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n" +
                  "null\n")
  assert humaneval.main(["--samples", str(path), "--problems", "0", "--k", "1"]) == 2
  err = capsys.readouterr().err
  assert "sample 1 is no object" in err and "Traceback" not in err


# --- stop sequences ----------------------------------------------------------


@pytest.mark.parametrize("stops", ["\n\n", [""], ("\ndef ", ""), [None]])
def test_stop_sequences_that_would_cut_every_completion_are_refused(stops):
  """A string would be read character by character (cutting at the first newline), and
  an empty stop sequence matches at 0: every completion would silently be cut to ""."""
  with pytest.raises(ValueError, match="stop"):
    humaneval.truncate_completion("    return 1\n\ndef g():\n", stops)


def test_generate_and_score_refuses_bad_stop_sequences_before_generating(problems):
  drawn = []

  def generate(prompts):
    drawn.extend(prompts)
    return ["    return 1\n"] * len(prompts)

  one = {"HumanEval/0": problems["HumanEval/0"]}
  with pytest.raises(ValueError, match="stop"):
    humaneval.generate_and_score(generate, one, ks=(1,), stop_sequences="\n\n",
                                 progress=None)
  assert not drawn


def test_stop_sequences_still_cut_at_the_first_match():
  text = "    return 1\n# note\ndef g():\n    pass\n"
  assert humaneval.truncate_completion(text) == "    return 1"
  assert humaneval.truncate_completion(text, ["\ndef "]) == "    return 1\n# note"
  assert humaneval.truncate_completion(text, []) == text


# --- the runner's report of an exception ---------------------------------------


def test_runaway_recursion_under_a_raised_limit_reports_only_the_innermost_frames():
  """The runner formatted every frame of the traceback: at a recursion limit of 10**6
  (common in generated code) that took minutes, so the run read as a "timeout" and used
  up its whole limit. Only the innermost frames are formatted now (none of this test's
  assertions is on time: the depth here is small enough for the old runner too)."""
  source = ("import sys\nsys.setrecursionlimit(5000)\n"
            "def f(n):\n  return f(n + 1)\n")
  result = sandbox.run_program(source, limits=GENEROUS, call="f(0)")
  assert result.status == "failed", result.detail
  assert result.detail.startswith("RecursionError"), result.detail
  repeated = re.search(r"Previous line repeated (\d+) more times", result.stderr)
  assert repeated and int(repeated[1]) < 100, result.stderr[-500:]
  assert "outer frames of the RecursionError traceback omitted" in result.stderr


def test_a_short_chained_traceback_is_printed_whole():
  source = ("def g():\n  raise KeyError('k')\n"
            "def f():\n  try:\n    g()\n  except KeyError as e:\n"
            "    raise ValueError('v') from e\n")
  result = sandbox.run_program(source, limits=GENEROUS, call="f()")
  assert result.status == "failed" and result.detail == "ValueError: v"
  assert "KeyError: 'k'" in result.stderr and "omitted" not in result.stderr
  assert "line 2, in g" in result.stderr and "line 7, in f" in result.stderr


@pytest.mark.parametrize("signum, name", [(40, "signal 40"), (signal.SIGUSR1, "SIGUSR1")])
def test_a_program_killed_by_any_signal_is_scored_killed(signum, name):
  """run_program never raises for what the program does: a real-time signal has no
  `signal.Signals` member, and naming it raised ValueError."""
  result = sandbox.run_program(f"import signal\nsignal.raise_signal({int(signum)})\n",
                               limits=GENEROUS, call="None")
  assert (result.status, result.returncode, result.detail) == ("killed", -signum, name)


# --- problems files and the CLI -----------------------------------------------

_PROBLEM = {"task_id": "X/0", "prompt": "def f():\n", "test": "def check(c):\n  pass\n",
            "entry_point": "f"}


@pytest.mark.parametrize("change, message", [
    ({"test": None}, r"\['test'\] must be strings"),
    ({"task_id": 0}, r"\['task_id'\] must be strings"),
    ({"prompt": ["def f():\n"]}, r"\['prompt'\] must be strings"),
    ({"entry_point": "f()"}, "entry_point 'f\\(\\)' is not a Python identifier"),
])
def test_a_problem_with_a_field_no_check_program_can_use_is_refused(tmp_path, change,
                                                                    message):
  """Each of these loaded, then every sample of the problem scored "error" (or
  --problems died in an AttributeError) while the run reported a pass@k."""
  path = tmp_path / "problems.jsonl"
  humaneval.write_jsonl(str(path), [{**_PROBLEM, **change}])
  with pytest.raises(ValueError, match=f"problem 1: {message}"):
    humaneval.load_problems(str(path))


def test_a_well_formed_custom_problem_still_scores(tmp_path):
  path = tmp_path / "problems.jsonl"
  humaneval.write_jsonl(str(path), [_PROBLEM])
  problems = humaneval.load_problems(str(path))
  summary = humaneval.score_samples([{"task_id": "X/0", "completion": "  return 1\n"}],
                                    problems, ks=(1,), workers=1, limits=GENEROUS)
  assert summary["pass_at_k"] == {"pass@1": 1.0}


def test_a_huge_problem_range_is_refused_without_building_an_id_per_index(problems):
  """`--problems 0-1000000000000` built 10**12 ids (hanging, then out of memory) before
  refusing them; memory is the deterministic measure of that here."""
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match="unknown problems HumanEval/164"):
      humaneval.select_problems(problems, "0-300000")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 1 << 20, f"{peak} bytes to refuse a range"
  assert len(humaneval.select_problems(problems, "160-163")) == 4


def test_an_output_path_in_a_missing_directory_is_refused_before_scoring(
    tmp_path, monkeypatch, capsys):
  ran = []
  monkeypatch.setattr(humaneval, "check_completion",
                      lambda *a, **k: ran.append(a) or sandbox.Result("passed", 0, "",
                                                                      "", 0.0))
  samples = tmp_path / "samples.jsonl"
  samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n")
  with pytest.raises(SystemExit) as exit_info:
    humaneval.main(["--samples", str(samples), "--problems", "0", "--k", "1",
                    "--output", str(tmp_path / "absent" / "summary.json")])
  assert exit_info.value.code == 2
  assert "absent" in capsys.readouterr().err
  assert not ran


def test_a_decoder_returning_no_text_is_named(problems):
  one = {"HumanEval/0": problems["HumanEval/0"]}
  with pytest.raises(ValueError, match="generate_fn returned None for a HumanEval/0"):
    humaneval.generate_and_score(lambda prompts: [None] * len(prompts), one, ks=(1,),
                                 progress=None)
