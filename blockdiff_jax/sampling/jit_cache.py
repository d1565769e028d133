"""A small least-recently-used cache of jitted decoder functions.

Keys are hashable static arguments (frozen dataclasses: the logits function, the
decoding options, static widths), never host callbacks, so a new streaming callback
does not compile anew and the cache cannot grow without bound.
"""

import collections
import operator
import threading
from typing import Any, Callable, Hashable

# Static widths below this are not worth a program of their own.
_MIN_BUCKET = 16


class JitCache:
  """Maps a hashable key to the function ``build(key)`` made, keeping the newest ``maxsize``."""

  def __init__(self, maxsize: int):
    if maxsize < 1:
      raise ValueError(f"JitCache maxsize must be >= 1, got {maxsize}")
    self.maxsize = maxsize
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key: Hashable, build: Callable[[Any], Callable]) -> Callable:
    """The function for ``key``, built on a miss; evicts the least recently used."""
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    fn = build(key)
    with self._lock:
      self._items[key] = fn
      self._items.move_to_end(key)
      while len(self._items) > self.maxsize:
        self._items.popitem(last=False)
    return fn

  def __len__(self) -> int:
    return len(self._items)

  def __contains__(self, key: Hashable) -> bool:
    return key in self._items

  def clear(self) -> None:
    with self._lock:
      self._items.clear()


def bucket(n: int, limit: int) -> int:
  """A static width >= ``n`` from a small set, so nearby sizes share one compiled program.

  The set is 16, then four widths per octave (20, 24, 28, 32, 40, 48, ...): at most a
  quarter of the width is padding. The result is capped at ``limit`` (the canvas width).

  Args:
    n: the width needed (e.g. the longest prompt of a batch), >= 0.
    limit: the largest usable width, >= n.
  """
  # A numpy width (``lengths.max()``) has no ``bit_length``; a float is no width at all.
  n, limit = operator.index(n), operator.index(limit)
  if not 0 <= n <= limit:
    raise ValueError(f"bucket: n={n} must be in [0, limit={limit}]")
  n = max(n, _MIN_BUCKET)
  step = 1 << max(n.bit_length() - 3, 0)  # A quarter of the octave [2^e, 2^(e+1)) holding n.
  return min(-(-n // step) * step, limit)
