"""Verifiable synthetic tasks, generated on the fly.

Each example is a ``(prompt, answer)`` pair of plain strings; the answer is a
pure function of the prompt, so ``check`` verifies a completion by solving the
prompt again rather than by looking anything up.

Tasks (``digits`` sets the difficulty):

* ``sort``: ``"sort: 3 1 4 1 5"`` -> ``"1 1 3 4 5"``; ``digits`` single-digit
  numbers.
* ``add``: ``"add: 123+4567"`` -> ``"4690"``; each operand has 1..``digits``
  digits.
* ``copy_edit``: ``"copy_edit: qwerty; set 2 to z"`` -> ``"qwzrty"``; a
  ``digits``-letter string, 0-based position, the new letter always differs.

Determinism and splits: example ``index`` of a split is drawn from
``numpy.random.default_rng([seed, split_code, task_code, index])``, so train and
validation use disjoint seed streams. In addition the prompt space is
partitioned by hash: a prompt belongs to validation iff
``int(sha1(prompt)) % 10 == 0``, and each split redraws until it gets a prompt
of its own part. Train and validation therefore never share a prompt, however
small the task space.
"""

import hashlib
import re
from typing import Callable, Sequence

import numpy as np

TASKS = ("sort", "add", "copy_edit")
SPLITS = ("train", "validation")
DEFAULT_DIGITS = 5
MAX_DIGITS = 64
EOS_TEXT = "<|eos|>"  # How a completion decoded with specials shows EOS.

_VALIDATION_BUCKETS = 10  # 1 in 10 prompts is reserved for validation.
_MAX_DRAWS = 10_000
_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# re.ASCII: a plain \d also matches other scripts' digits ("add: \u0663+1" would solve
# to "4" through int()), accepting prompts no generator writes.
_SORT_RE = re.compile(r"sort: (\d(?: \d)*)", re.ASCII)
_ADD_RE = re.compile(r"add: (\d+)\+(\d+)", re.ASCII)
_COPY_EDIT_RE = re.compile(r"copy_edit: ([a-z]+); set (\d+) to ([a-z])", re.ASCII)


def validate_task(task: str) -> str:
  """Returns ``task`` if it is a known task name, else raises ValueError."""
  if task not in TASKS:
    raise ValueError(f"Unknown synthetic task {task!r}; known tasks: {TASKS}.")
  return task


def parse_tasks(spec: str) -> tuple[str, ...]:
  """Parses a comma-separated task list such as ``"sort,add"``.

  Raises:
    ValueError: naming no task, an unknown one, or one twice. ``mixed_example`` gives
      task ``tasks[i % n]`` its example ``i // n``, so a repeated task would repeat each
      of its examples (``"sort,sort,add"``: every sort example twice), not weight it.
  """
  tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
  if not tasks:
    raise ValueError(f"No synthetic task named in {spec!r}.")
  for t in tasks:
    validate_task(t)
  repeated = sorted({t for t in tasks if tasks.count(t) > 1})
  if repeated:
    raise ValueError(f"Synthetic task(s) {', '.join(map(repr, repeated))} named more than "
                     f"once in {spec!r}: tasks are mixed uniformly and a repeat would "
                     "only repeat its examples; name each task once.")
  return tasks


def _validate_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return split


def prompt_split(prompt: str) -> str:
  """The split that owns ``prompt`` under the hash partition."""
  h = int(hashlib.sha1(prompt.encode("utf-8")).hexdigest(), 16)
  return "validation" if h % _VALIDATION_BUCKETS == 0 else "train"


def _gen_sort(rng: np.random.Generator, digits: int) -> str:
  return "sort: " + " ".join(str(d) for d in rng.integers(0, 10, digits))


def _gen_number(rng: np.random.Generator, digits: int) -> str:
  n = int(rng.integers(1, digits + 1))
  if n == 1:
    return str(int(rng.integers(0, 10)))
  lead = str(int(rng.integers(1, 10)))
  return lead + "".join(str(d) for d in rng.integers(0, 10, n - 1))


def _gen_add(rng: np.random.Generator, digits: int) -> str:
  return f"add: {_gen_number(rng, digits)}+{_gen_number(rng, digits)}"


def _gen_copy_edit(rng: np.random.Generator, digits: int) -> str:
  letters = [_LETTERS[i] for i in rng.integers(0, 26, digits)]
  pos = int(rng.integers(0, digits))
  # Offset 1..25 guarantees the new letter differs from the old one.
  new = _LETTERS[(_LETTERS.index(letters[pos]) + int(rng.integers(1, 26))) % 26]
  return f"copy_edit: {''.join(letters)}; set {pos} to {new}"


_GENERATORS: dict[str, Callable[[np.random.Generator, int], str]] = {
    "sort": _gen_sort,
    "add": _gen_add,
    "copy_edit": _gen_copy_edit,
}


def solve(task: str, prompt: str) -> str:
  """Computes the answer of a prompt of ``task``.

  Raises:
    ValueError: if the task is unknown or the prompt is not of that task.
  """
  validate_task(task)
  if task == "sort":
    m = _SORT_RE.fullmatch(prompt)
    if m:
      return " ".join(sorted(m.group(1).split(" ")))
  elif task == "add":
    m = _ADD_RE.fullmatch(prompt)
    if m:
      return str(int(m.group(1)) + int(m.group(2)))
  else:
    m = _COPY_EDIT_RE.fullmatch(prompt)
    if m and int(m.group(2)) < len(m.group(1)):
      text, pos = m.group(1), int(m.group(2))
      return text[:pos] + m.group(3) + text[pos + 1:]
  raise ValueError(f"Prompt {prompt!r} is not a valid {task!r} prompt.")


def _check_digits(digits: int) -> int:
  """Returns ``digits`` if it is an int in [1, MAX_DIGITS], else raises ValueError.

  A bool is refused as ``data.synthetic_digits`` refuses it (True would mean 1 digit).
  """
  if (isinstance(digits, bool) or not isinstance(digits, (int, np.integer))
      or not 1 <= digits <= MAX_DIGITS):
    raise ValueError(f"digits must be an int in [1, {MAX_DIGITS}], got "
                     f"{digits!r}.")
  return digits


def make_example(task: str, seed: int, index: int, *, split: str = "train",
                 digits: int = DEFAULT_DIGITS) -> tuple[str, str]:
  """Generates example ``index`` of ``task`` for ``split``.

  Args:
    task: one of ``TASKS``.
    seed: non-negative base seed.
    index: non-negative example index.
    split: ``"train"`` or ``"validation"``.
    digits: difficulty, 1..MAX_DIGITS (see module docstring).

  Returns:
    ``(prompt, answer)``, a pure function of the arguments.

  Raises:
    ValueError: on an invalid argument, or if the split's part of the task
      space is empty (only possible for tiny ``digits``).
  """
  validate_task(task)
  _validate_split(split)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index must be a non-negative int, got {index!r}.")
  _check_digits(digits)
  rng = np.random.default_rng(
      [int(seed), SPLITS.index(split), TASKS.index(task), int(index)])
  gen = _GENERATORS[task]
  for _ in range(_MAX_DRAWS):
    prompt = gen(rng, int(digits))
    if prompt_split(prompt) == split:
      return prompt, solve(task, prompt)
  raise ValueError(f"Found no {split!r} prompt for task {task!r} with "
                   f"digits={digits} in {_MAX_DRAWS} draws; raise digits.")


def longest_example(task: str, digits: int = DEFAULT_DIGITS) -> tuple[str, str]:
  """A ``(prompt, answer)`` of ``task`` as long (in characters) as any it generates.

  Not necessarily of either split: it bounds the row length a dataset must hold, so a
  ``seq_len`` too short for a rare long example is refused before training starts.

  Raises:
    ValueError: on an unknown task, or ``digits`` outside [1, MAX_DIGITS] (which
      ``make_example`` refuses too, so no bound is given for examples never made).
  """
  validate_task(task)
  _check_digits(digits)
  if task == "sort":
    prompt = "sort: " + " ".join(["9"] * digits)
  elif task == "add":  # Both operands at full length, and a carry into one more digit.
    prompt = f"add: {'9' * digits}+{'9' * digits}"
  else:  # The last position has the most digits.
    prompt = f"copy_edit: {'a' * digits}; set {digits - 1} to b"
  return prompt, solve(task, prompt)


def mixed_example(tasks: Sequence[str], seed: int, index: int, *,
                  split: str = "train",
                  digits: int = DEFAULT_DIGITS) -> tuple[str, str, str]:
  """Example ``index`` of a uniform round-robin mix of ``tasks``.

  Returns:
    ``(task, prompt, answer)``; task ``tasks[index % len(tasks)]`` with its
    own example index ``index // len(tasks)``.
  """
  if not tasks:
    raise ValueError("mixed_example needs at least one task.")
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index must be a non-negative int, got {index!r}.")
  task = tasks[index % len(tasks)]
  prompt, answer = make_example(task, seed, index // len(tasks), split=split,
                                digits=digits)
  return task, prompt, answer


def _clean_completion(completion: str) -> str:
  """Cuts at the first EOS marker and strips trailing whitespace."""
  return completion.split(EOS_TEXT, 1)[0].rstrip()


def check(task: str, prompt: str, completion: str) -> bool:
  """Exact match of ``completion`` against the answer of ``prompt``.

  The completion is cut at the first ``<|eos|>`` (present when it was decoded
  with special tokens) and trailing whitespace is stripped.

  Raises:
    ValueError: if the task is unknown or the prompt is not of that task.
  """
  return _clean_completion(completion) == solve(task, prompt)


def exact_match(task: str, prompts: Sequence[str],
                completions: Sequence[str]) -> float:
  """Fraction of completions that ``check`` accepts."""
  if len(prompts) != len(completions):
    raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} "
                     "completions.")
  if not prompts:
    raise ValueError("exact_match needs at least one prompt.")
  hits = sum(check(task, p, c) for p, c in zip(prompts, completions))
  return hits / len(prompts)
