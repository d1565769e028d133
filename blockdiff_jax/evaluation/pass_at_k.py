"""Unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language
Models Trained on Code").

For a problem with n samples of which c pass,

  pass@k = 1 - C(n - c, k) / C(n, k)

is the probability that a random size-k subset of the n samples contains at
least one passing sample. The binomials overflow floats for realistic n, so the
ratio is computed as the product prod_{i = n-c+1}^{n} (1 - k / i), which equals
C(n - c, k) / C(n, k) and only multiplies numbers in [0, 1].
"""

from __future__ import annotations

import numbers
from typing import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k estimate for one problem.

  Args:
    n: number of samples drawn for the problem.
    c: number of those samples that passed.
    k: subset size; must satisfy 1 <= k <= n.

  Returns:
    The estimate in [0, 1].

  Raises:
    ValueError: on a non-integer or inconsistent argument.
  """
  for name, value in (("n", n), ("c", c), ("k", k)):
    # A float k (2.5) would give a number that is no probability of any subset.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
  if n - c < k:
    # Every size-k subset must contain a passing sample.
    return 1.0
  ratio = 1.0
  for i in range(n - c + 1, n + 1):
    ratio *= 1.0 - k / i
  return 1.0 - ratio


def mean_pass_at_k(counts: Iterable[tuple[int, int]],
                   ks: Sequence[int]) -> dict[str, float]:
  """pass@k averaged over problems, for every k that all problems support.

  Args:
    counts: (n, c) per problem.
    ks: candidate k values; those larger than the smallest n are skipped,
      because pass@k is undefined for a problem with fewer than k samples.
      At least one must be usable: an empty result would read as "nothing
      measured" rather than as a wrong request.

  Returns:
    {"pass@k": mean estimate} for the usable ks, in the order given.

  Raises:
    ValueError: if `counts` is empty, or no k in `ks` is <= the smallest n.
  """
  counts = list(counts)
  # A one-shot iterable (a generator) was used up by the check below: the error then
  # said "no k in ks=[]" whatever ks held.
  ks = tuple(ks)
  if not counts:
    raise ValueError("no problems to average over")
  min_n = min(n for n, _ in counts)
  check_ks(ks, min_n)
  return {
      f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
      for k in ks if k <= min_n
  }


def check_ks(ks: Sequence[int], min_samples: int) -> None:
  """Raises ValueError unless every k is an integer >= 1 and some k is <= `min_samples`.

  Callers run it before drawing or executing samples, so that a request no
  sample count can answer fails first rather than after the work.
  """
  ks = tuple(ks)  # Iterated twice below, and named in the errors.
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
      raise ValueError(f"pass@k: every k must be an integer >= 1, got ks={list(ks)}")
  if not any(k <= min_samples for k in ks):
    raise ValueError(f"pass@k: no k in ks={list(ks)} is <= {min_samples}, the "
                     "fewest samples of any problem (pass@k needs k <= n)")


def counts_from_results(passed_by_task: Mapping[str, Sequence[bool]]
                        ) -> list[tuple[int, int]]:
  """(n, c) per task from lists of per-sample pass flags."""
  return [(len(flags), sum(bool(f) for f in flags))
          for flags in passed_by_task.values()]
