"""Long-context retrieval tasks built offline: passkey retrieval and key-value recall.

Each example is a prompt of exactly ``length`` tokens of a given tokenizer and a
short answer, scored by exact match. The prompt is an instruction, a haystack of
real text with the needle(s) inserted, and a question::

  passkey:   "A pass key is hidden in the text below. Remember it."
             <haystack> "The pass key is 48213. Remember it. 48213 is the pass key."
             <haystack> "What is the pass key? The pass key is"    -> "48213"
  kv_recall: "Key-value pairs are hidden in the text below. Remember them."
             <haystack> 'Key "3f9a0c1e" has value "b7d2e915".' <haystack> ... (num_pairs)
             'What is the value of key "3f9a0c1e"? The value is'  -> "b7d2e915"

Haystack: docstrings (or raw source) of the Python standard library, read like
``corpora.stdlib_documents`` (sorted files, nothing downloaded), tokenized once;
each example takes a window of it at a seeded offset.

Depth: the fraction of the haystack tokens that precede the (queried) needle; 0
puts it right after the instruction, 1 right before the question. For
``kv_recall`` the other pairs sit at seeded random depths.

The example is built in token space (pieces are encoded separately and
concatenated), so ``prompt_ids`` has exactly ``length`` tokens and the needle
occupies ``prompt_ids[needle_start:needle_end]``; ``prompt`` is its decoding, for
display. Everything is a pure function of (task, length, depth, seed, index) and
the haystack: ``numpy.random.default_rng([seed, task, length, depth * 1e6, index])``.
"""

import ast
import dataclasses
import functools
import numbers
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from blockdiff_jax.data import corpora

TASKS = ("passkey", "kv_recall")
HAYSTACK_SOURCES = ("docstrings", "source")
EOS_TEXT = "<|eos|>"  # How a completion decoded with specials shows EOS.
# Needle seeds of the training streams start here (see ``training_example``).
TRAINING_SEED_BASE = 1_000_000

_INSTRUCTION = {
    "passkey": "A pass key is hidden in the text below. Remember it.\n\n",
    "kv_recall": "Key-value pairs are hidden in the text below. Remember them.\n\n",
}
_PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
_PAIR_NEEDLE = '\n\nKey "{key}" has value "{value}".\n\n'
_PAIR_QUESTION = '\n\nWhat is the value of key "{key}"? The value is'
_PASSKEY_RE = re.compile(r"The pass key is (\d+)\. Remember it\.")
_QUESTION_KEY_RE = re.compile(r'What is the value of key "([0-9a-f]+)"\?')
# What may follow an answer (``exact_match``): closing punctuation (ASCII, curly quotes,
# CJK full stop), then the end, a line break (a list or the next line may start with a
# digit), or blanks before a word, never before another number on the line ("48213 7").
_ANSWER_END_RE = re.compile(
    r"""[.,;:!?"')\]*\u201d\u2019\u300d\u3002]*"""
    r"""(?:$|[^\S\n]*?[\r\n\u2028\u2029]|[^\S\r\n\u2028\u2029]+(?![\s\d]))""")


@dataclasses.dataclass(frozen=True)
class LongContextExample:
  """One prompt/answer pair.

  Attributes:
    task: "passkey" or "kv_recall".
    length: prompt length in tokens (== len(prompt_ids)).
    depth: requested needle depth in [0, 1].
    seed: generation seed.
    index: example index within its (task, length, depth) cell.
    prompt_ids: int32 [length] token ids the model reads.
    prompt: the decoded prompt (display and ``solve``).
    answer: the expected completion, e.g. "48213".
    answer_ids: int32 token ids of the answer.
    needle_start: first token of the (queried) needle in prompt_ids.
    needle_end: one past its last token.
    haystack_tokens: haystack tokens in the prompt (the depth's denominator).
    haystack_before: haystack tokens before the needle (other pairs excluded).
  """

  task: str
  length: int
  depth: float
  seed: int
  index: int
  prompt_ids: np.ndarray
  prompt: str
  answer: str
  answer_ids: np.ndarray
  needle_start: int
  needle_end: int
  haystack_tokens: int
  haystack_before: int

  @property
  def measured_depth(self) -> float:
    """The needle's realised depth: haystack_before / haystack_tokens."""
    return self.haystack_before / self.haystack_tokens


class PromptTooShortError(ValueError):
  """A prompt length cannot hold the task's instruction, needles and question."""


def validate_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"Unknown long-context task {task!r}; known tasks: {TASKS}.")
  return task


# ------------------------------------------------------------------- haystack


def _docstrings(source: str) -> Iterable[str]:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= 80:  # One-liners are mostly noise ("Return x.").
        yield doc


@functools.lru_cache(maxsize=8)
def haystack_text(min_chars: int, source: str = "docstrings", root: str | None = None) -> str:
  """At least ``min_chars`` characters of standard-library text, in sorted file order.

  Args:
    min_chars: characters wanted; raises if the whole library has fewer.
    source: "docstrings" (natural-language paragraphs) or "source" (whole files).
    root: the standard-library folder; default the running interpreter's.

  Returns:
    The texts of the first files (their docstrings), joined by blank lines.
  """
  if source not in HAYSTACK_SOURCES:
    raise ValueError(f"haystack source must be one of {HAYSTACK_SOURCES}, got {source!r}")
  root = root or corpora.stdlib_root()
  pieces, total = [], 0
  for key in corpora.stdlib_files(root):
    with open(os.path.join(root, key), "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    for piece in (_docstrings(text) if source == "docstrings" else [text]):
      pieces.append(piece)
      total += len(piece) + 2
    if total >= min_chars:
      return "\n\n".join(pieces)
  raise ValueError(f"The standard library at {root!r} has only {total} characters of "
                   f"{source}; {min_chars} were asked for.")


def load_haystack(tokenizer: Any, num_tokens: int, source: str = "docstrings") -> np.ndarray:
  """int32 token ids of at least ``num_tokens`` tokens of standard-library text."""
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
  chars = 4 * num_tokens + 4096
  while True:
    ids = np.asarray(tokenizer.encode(haystack_text(chars, source)), np.int32)
    if len(ids) >= num_tokens:
      return ids
    # Characters per token vary by tokenizer: ask for more text in proportion.
    chars = int(chars * 1.2 * num_tokens / max(len(ids), 1)) + 4096


# ------------------------------------------------------------------- examples


def _rng(task: str, length: int, depth: float, seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, TASKS.index(task), length, int(round(depth * 1e6)), index])


def _hex(rng: np.random.Generator, n: int) -> str:
  return "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, n))


def _encode(tokenizer: Any, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def make_example(task: str, tokenizer: Any, haystack: np.ndarray, *, length: int,
                 depth: float, seed: int = 0, index: int = 0, passkey_digits: int = 5,
                 num_pairs: int = 8) -> LongContextExample:
  """Builds one example of exactly ``length`` prompt tokens (see module docstring).

  Args:
    task: "passkey" or "kv_recall".
    tokenizer: anything with ``encode(str) -> ids`` and ``decode(ids) -> str``.
    haystack: token ids from ``load_haystack`` (at least ``length`` of them).
    length: prompt tokens.
    depth: fraction of the haystack before the (queried) needle, in [0, 1].
    seed: generation seed.
    index: example index (a different needle and haystack window per index).
    passkey_digits: digits of the pass key.
    num_pairs: key-value pairs in a kv_recall prompt (one is asked for).

  Returns:
    The example.

  Raises:
    PromptTooShortError: if ``length`` cannot hold the instruction, needles and question.
    ValueError: naming any other bad argument.
  """
  validate_task(task)
  # All three seed the generator: numpy would refuse a negative or float one as a bad
  # "seed", naming neither the argument nor its value.
  for name, value, low in (("length", length, 1), ("seed", seed, 0), ("index", index, 0)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  if not 1 <= passkey_digits <= 18:
    raise ValueError(f"passkey_digits must be in [1, 18], got {passkey_digits}")
  if num_pairs < 1:
    raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
  rng = _rng(task, length, depth, seed, index)
  if task == "passkey":
    answer = str(rng.integers(10 ** (passkey_digits - 1), 10 ** passkey_digits))
    needles = [_encode(tokenizer, _PASSKEY_NEEDLE.format(key=answer))]
    depths = [depth]
    question = _PASSKEY_QUESTION
  else:
    keys, values = [], []
    while len(keys) < num_pairs:  # Distinct keys, so the question has one answer.
      key = _hex(rng, 8)
      if key not in keys:
        keys.append(key)
        values.append(_hex(rng, 8))
    answer = values[0]
    needles = [_encode(tokenizer, _PAIR_NEEDLE.format(key=k, value=v))
               for k, v in zip(keys, values)]
    depths = [depth] + list(rng.uniform(0.0, 1.0, num_pairs - 1))
    question = _PAIR_QUESTION.format(key=keys[0])
  prefix = _encode(tokenizer, _INSTRUCTION[task])
  suffix = _encode(tokenizer, question)
  fixed = len(prefix) + len(suffix) + sum(len(n) for n in needles)
  budget = length - fixed
  if budget < 1:
    raise PromptTooShortError(f"length={length} is too short for task {task!r}: its "
                              f"instruction, needles and question take {fixed} tokens")
  if len(haystack) < budget:
    raise ValueError(f"haystack has {len(haystack)} tokens, {budget} needed for "
                     f"length={length}; load a longer one")
  start = int(rng.integers(0, len(haystack) - budget + 1))
  hay = haystack[start:start + budget]
  # Insert each needle at its depth; ties keep the queried needle (index 0) first, but
  # at the very end it goes last: depth 1 puts it right before the question.
  cuts = [int(round(d * budget)) for d in depths]
  order = sorted(range(len(needles)),
                 key=lambda i: (cuts[i], i == 0 and cuts[i] == budget, i))
  parts, pos, needle_start = [prefix], 0, -1
  offset = len(prefix)
  for i in order:
    parts.append(hay[pos:cuts[i]])
    offset += cuts[i] - pos
    pos = cuts[i]
    if i == 0:
      needle_start = offset
    parts.append(needles[i])
    offset += len(needles[i])
  parts += [hay[pos:], suffix]
  ids = np.concatenate(parts).astype(np.int32)
  assert len(ids) == length, (len(ids), length)
  return LongContextExample(
      task=task, length=length, depth=float(depth), seed=seed, index=index, prompt_ids=ids,
      prompt=tokenizer.decode(ids), answer=answer,
      answer_ids=_encode(tokenizer, answer), needle_start=needle_start,
      needle_end=needle_start + len(needles[0]), haystack_tokens=budget,
      haystack_before=cuts[0])


def make_suite(tokenizer: Any, *, lengths: Sequence[int], depths: Sequence[float],
               per_cell: int = 1, tasks: Sequence[str] = TASKS, seed: int = 0,
               source: str = "docstrings", **task_options) -> list[LongContextExample]:
  """Examples for every (task, length, depth) cell, ``per_cell`` each, in that order."""
  if per_cell < 1:
    raise ValueError(f"per_cell must be >= 1, got {per_cell}")
  if not lengths or not depths:
    raise ValueError("make_suite needs at least one length and one depth")
  for task in tasks:
    validate_task(task)
  # Twice the longest prompt, so windows of different examples differ.
  haystack = load_haystack(tokenizer, 2 * max(lengths), source)
  return [make_example(task, tokenizer, haystack, length=n, depth=d, seed=seed, index=i,
                       **task_options)
          for task in tasks for n in lengths for d in depths for i in range(per_cell)]


def min_prompt_length(task: str, tokenizer: Any, num_pairs: int = 4,
                      margin: int = 16) -> int:
  """Shortest prompt length that fits ``task``'s fixed parts, plus ``margin`` tokens.

  The margin is haystack tokens, at least one (``make_example`` refuses an empty
  haystack, so ``margin=0`` gives the fixed parts plus one); it also absorbs keys whose
  encoding is longer than the probe's (BPE tokenizers).
  """
  probe = make_example(task, tokenizer, np.zeros(4096, np.int32), length=4096, depth=0.0,
                       num_pairs=num_pairs)
  return probe.length - probe.haystack_tokens + max(margin, 1)


def training_example(tasks: Sequence[str], tokenizer: Any, haystack: np.ndarray, *,
                     index: int, split: str, seed: int, min_length: int, max_length: int,
                     num_pairs: int = 4,
                     depth_range: tuple[float, float] = (0.0, 1.0)) -> LongContextExample:
  """Example ``index`` of a training (or validation) stream of retrieval prompts.

  The task cycles through ``tasks``; the prompt length is uniform in
  ``[min_length, max_length]`` and the needle depth uniform in ``depth_range`` (a
  curriculum narrows it early in training), both drawn from
  ``default_rng([seed, split, index])``. A BPE tokenizer splits each example's random
  keys into a different number of tokens, so a prompt's fixed parts can outgrow the
  drawn length (``min_prompt_length`` only probes one example): such an example takes
  the next longer length that holds it, wrapping round to ``min_length``, and only if
  no length in the range does is it an error. The needles come from ``make_example`` with
  the seed ``TRAINING_SEED_BASE + 2 * seed + (split == "validation")``, so the train
  and validation streams are disjoint from each other and from evaluation suites
  (``make_suite`` uses small seeds and round depths).

  Args:
    tasks: task names, cycled by index.
    tokenizer: the tokenizer.
    haystack: token ids from ``load_haystack`` (at least ``max_length`` of them).
    index: example index in the stream.
    split: "train" or "validation".
    seed: stream seed.
    min_length: shortest prompt, in tokens.
    max_length: longest prompt, in tokens.
    num_pairs: key-value pairs per kv_recall prompt.
    depth_range: (lowest, highest) depth of the queried needle, within [0, 1].
  """
  corpora.validate_split(split)
  if not tasks:
    raise ValueError("training_example needs at least one task")
  if not 1 <= min_length <= max_length:
    raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
  low, high = depth_range
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"depth_range must satisfy 0 <= low <= high <= 1, got {depth_range}")
  code = int(split == "validation")
  rng = np.random.default_rng([seed, code, index])
  length = int(rng.integers(min_length, max_length + 1))
  # (0, 1) draws what the stream drew before depth ranges existed: the same examples.
  depth = float(rng.uniform(low, high))
  task = validate_task(tasks[index % len(tasks)])
  # The keys are drawn from (length, index): each retried length gives other keys.
  for n in [*range(length, max_length + 1), *range(min_length, length)]:
    try:
      return make_example(task, tokenizer, haystack, length=n, depth=depth,
                          seed=TRAINING_SEED_BASE + 2 * seed + code, index=index,
                          num_pairs=num_pairs)
    except PromptTooShortError:
      continue
  raise PromptTooShortError(
      f"{split} example {index} ({task}, {num_pairs} pairs): no prompt length in "
      f"[min_length={min_length}, max_length={max_length}] holds its instruction, needles "
      f"and question; raise data.long_context_min_length or data.seq_len, or lower "
      f"data.long_context_num_pairs")


def training_row(ex: LongContextExample, tokenizer: Any, seq_len: int, block: int,
                 score_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and loss mask [seq_len] of ``BOS prompt SEP answer EOS...`` for ``ex``.

  Built from the example's token ids (no re-encoding of its text). The answer, its EOS
  and the rest of the block the EOS falls in are masked (the decoder's view of the
  answer's block, all MASK, then matches training); the prompt after BOS too with
  ``score_prompt``.
  """
  head = np.concatenate([[tokenizer.bos_id], ex.prompt_ids, [tokenizer.sep_id]])
  end = len(head) + len(ex.answer_ids) + 1
  if end > seq_len:
    raise ValueError(f"Example {ex.index}: answer of {len(ex.answer_ids)} tokens does not "
                     f"fit after a {len(head)}-token prompt in seq_len={seq_len}")
  tokens = np.full(seq_len, tokenizer.eos_id, np.int32)
  tokens[:len(head)], tokens[len(head):end - 1] = head, ex.answer_ids
  mask = np.zeros(seq_len, np.float32)
  mask[1 if score_prompt else len(head):min(-(-end // block) * block, seq_len)] = 1.0
  return tokens, mask


def scored_text(ex: LongContextExample, score_prompt: bool = False
                ) -> tuple[str, np.ndarray]:
  """(text, token ids) of what ``training_row`` scores, less its special tokens.

  The answer; with ``score_prompt`` the prompt before it, whose haystack has its own
  bytes per token (BPE: several bytes of prose per token, about one per digit of a key):
  bits/byte over the scored tokens divides by theirs, not the answers'.
  """
  if not score_prompt:
    return ex.answer, np.asarray(ex.answer_ids)
  return ex.prompt + ex.answer, np.concatenate([ex.prompt_ids, ex.answer_ids])


CURRICULA = ("switch", "widen")


@dataclasses.dataclass(frozen=True)
class DepthCurriculum:
  """Where training needles sit in the first ``steps`` batches of a run.

  A needle anywhere in a long prompt is a search; a model that has not yet learnt to
  copy may never find one. Training first on needles at a narrow band of depths (a
  fixed place relative to the prompt's start) lets the copy form, then the band opens:
  ``"switch"`` holds ``[low, high]`` for ``steps`` batches, then draws from [0, 1];
  ``"widen"`` grows the band linearly from ``[low, high]`` to [0, 1] over them, after
  holding it for the first ``hold`` (a fixed phase then a widening one, in one run).
  Validation streams and evaluation suites never use it.
  """

  steps: int = 0  # Batches under the curriculum; 0: none.
  low: float = 0.0  # Band of queried-needle depths at the start.
  high: float = 1.0
  kind: str = "switch"  # One of CURRICULA.
  hold: int = 0  # "widen": batches at [low, high] before the band grows.

  def __post_init__(self):
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
      raise ValueError(f"curriculum steps must be an integer >= 0, got {self.steps!r}")
    if not 0.0 <= self.low <= self.high <= 1.0:
      raise ValueError(f"curriculum depths must satisfy 0 <= low <= high <= 1, got "
                       f"({self.low}, {self.high})")
    if self.kind not in CURRICULA:
      raise ValueError(f"curriculum must be one of {CURRICULA}, got {self.kind!r}")
    if (isinstance(self.hold, bool) or not isinstance(self.hold, int)
        or not 0 <= self.hold <= self.steps):
      raise ValueError(f"curriculum hold must be an integer in [0, steps={self.steps}], "
                       f"got {self.hold!r}")
    if self.hold and self.kind != "widen":  # "switch" holds the band for all its steps.
      raise ValueError(f"curriculum hold={self.hold} applies to 'widen', not {self.kind!r}")

  @classmethod
  def parse(cls, steps: int, depths: str, kind: str = "switch",
            hold: int = 0) -> "DepthCurriculum":
    """From config strings: ``depths`` is ``"low,high"`` (e.g. ``"0,0.05"``)."""
    try:
      low, high = (float(x) for x in str(depths).split(","))
    except ValueError:
      raise ValueError(f"curriculum depths must be 'low,high', got {depths!r}") from None
    return cls(steps, low, high, kind, hold)

  def depth_range(self, batch: int) -> tuple[float, float]:
    """The depth band of training batch ``batch`` (0-based: step ``batch + 1``)."""
    if batch >= self.steps:
      return 0.0, 1.0
    if self.kind == "switch" or batch < self.hold:
      return self.low, self.high
    f = (batch - self.hold) / (self.steps - self.hold)
    return self.low * (1.0 - f), self.high + (1.0 - self.high) * f


# -------------------------------------------------------------------- scoring


def clean_completion(completion: str) -> str:
  """Cuts at the first ``<|eos|>`` marker and strips surrounding whitespace."""
  return completion.split(EOS_TEXT, 1)[0].strip()


def exact_match(completion: str, answer: str) -> bool:
  """True iff the cleaned completion opens with the whole answer and nothing more of it.

  The prompts end the answer as the needle does: ``The pass key is 48213. Remember it.``
  and ``has value "b7d2e915".``. So after the answer the completion may stop, or go on
  with closing punctuation (``.,;:!?"')]*``, curly quotes, ``\u3002``) that is then
  followed by the end, a line break, or blanks before a word: ``" 48213."``,
  ``48213. Remember it.``, ``48213.\n2. next`` and ``"b7d2e915".`` are hits.
  ``482130``, ``4821``, ``48213.5``, ``48213 7`` or ``48213, 7`` (another number goes on
  on the same line), and ``b7d2e915_x`` or ``48213-ab`` (the key glued to more text)
  are not. The same rule as ``evaluation.long_context.answer_matches``, so ``score`` agrees
  with the ``hit`` of ``retrieval``'s rows.
  """
  text = clean_completion(completion).strip(" \"'")
  return text.startswith(answer) and bool(_ANSWER_END_RE.match(text[len(answer):]))


def solve(example_or_prompt: Any) -> str:
  """Reads the answer off a prompt's text (an oracle for tests and sanity checks)."""
  prompt = getattr(example_or_prompt, "prompt", example_or_prompt)
  if prompt.startswith(_INSTRUCTION["passkey"]):
    found = _PASSKEY_RE.findall(prompt)
  else:
    key = _QUESTION_KEY_RE.findall(prompt)
    if not key:
      raise ValueError("prompt is neither a passkey nor a kv_recall prompt")
    found = re.findall(r'Key "' + key[-1] + r'" has value "([0-9a-f]+)"\.', prompt)
  if len(found) != 1:
    raise ValueError(f"expected one needle in the prompt, found {len(found)}")
  return found[0]


def score(examples: Sequence[LongContextExample],
          completions: Sequence[str]) -> dict[str, Any]:
  """Exact-match accuracy overall and per (task, length, depth) cell.

  Returns:
    ``{"accuracy": float, "n": int, "cells": [{"task", "length", "depth", "n",
    "accuracy"}, ...]}`` with cells in first-seen order.
  """
  if len(examples) != len(completions):
    raise ValueError(f"Got {len(examples)} examples but {len(completions)} completions.")
  if not examples:
    raise ValueError("score needs at least one example.")
  cells: dict[tuple, list[bool]] = {}
  for ex, completion in zip(examples, completions):
    cells.setdefault((ex.task, ex.length, ex.depth), []).append(
        exact_match(completion, ex.answer))
  hits = [h for v in cells.values() for h in v]
  return {"accuracy": sum(hits) / len(hits), "n": len(hits),
          "cells": [{"task": t, "length": n, "depth": d, "n": len(v),
                     "accuracy": sum(v) / len(v)} for (t, n, d), v in cells.items()]}
