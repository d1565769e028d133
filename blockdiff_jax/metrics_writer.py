"""Metrics to a JSONL file, TensorBoard event files (tensorboardX) and a console line."""

import json
import os
import time
from typing import Any

import numpy as np


def _scalar(v: Any) -> float:
  # reshape: numpy 2 refuses float() of an array of size 1 that is not 0-d ([x], [[x]]).
  return float(np.asarray(v).reshape(()))


# The row key that names a row's non-finite values; they are written as null.
NONFINITE_KEY = "_nonfinite"
_NONFINITE_NAMES = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def finite_or_none(tree: Any) -> Any:
  """``tree`` (dicts, lists, tuples, numbers) with NaN and infinities replaced by None.

  For result files: ``json.dump(finite_or_none(x), f, allow_nan=False)`` is strict JSON.
  """
  if isinstance(tree, dict):
    # json refuses numpy keys too (np.int64 from np.unique, a length bucket).
    return {k.item() if isinstance(k, np.generic) else k: finite_or_none(v)
            for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [finite_or_none(v) for v in tree]
  # json refuses numpy scalars other than float64 (float32, int64, bool_), numpy arrays
  # and jax arrays: a result holding one was lost at the final json.dump.
  if isinstance(tree, np.generic):
    tree = tree.item()
  elif hasattr(tree, "__array__") and not isinstance(tree, (str, bytes)):
    return finite_or_none(np.asarray(tree).tolist())
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree


def encode_row(row: dict) -> str:
  """One strict-JSON line of ``row``: a NaN or infinity becomes null, named in ``_nonfinite``.

  ``json.dumps`` would write the bare tokens NaN / Infinity, which strict parsers (jq,
  JavaScript's JSON.parse, some pandas engines) refuse. Plain ``json.loads`` readers see
  None (pandas and matplotlib show it as a gap); ``read_rows`` restores the floats.
  """
  out, nonfinite = {}, {}
  for k, v in row.items():
    if isinstance(v, float) and not np.isfinite(v):
      nonfinite[k] = "NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
      v = None
    out[k] = v
  if nonfinite:
    out[NONFINITE_KEY] = nonfinite
  return json.dumps(out, allow_nan=False)


def decode_row(line: str) -> dict:
  """A row written by ``encode_row``, its non-finite values restored as floats.

  Also reads rows of older files, which hold the bare NaN / Infinity tokens.
  """
  row = json.loads(line)
  for k, name in row.pop(NONFINITE_KEY, {}).items():
    row[k] = _NONFINITE_NAMES[name]
  return row


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics JSONL file (``decode_row`` each; blank lines skipped).

  A torn last line (no newline, not JSON: a kill mid-write, or a row being written
  while a live run is read) is skipped; a bad line before it still raises.
  """
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(decode_row(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1 and not line.endswith("\n"):
        break
      raise
  return rows


def truncate_rows(path: str, last_step: int) -> int:
  """Drops the rows of ``path`` (JSONL) whose step is after ``last_step``; returns how many.

  A torn last line (a kill mid-write) is dropped too; a whole last row without its
  newline gets one, since the next row appended would glue onto it.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped, unended = [], 0, False
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = int(row["step"]) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      unended |= keep and not line.endswith("\n")
      kept += [line if line.endswith("\n") else line + "\n"] if keep else []
      dropped += not keep
  if dropped or unended:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def _end_last_line(path: str) -> None:
  """Ends ``path``'s last line when it has no newline: appending would glue onto it.

  A torn row (a kill mid-write; not JSON) is cut off, since the next row glued onto it
  would make one unreadable line and both would be lost; a whole row just gets its
  newline.
  """
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    start = size
    while start > 0:  # Back to the newline before the last line (rows are short).
      start = max(0, start - 4096)
      f.seek(start)
      nl = f.read(size - start).rfind(b"\n")
      if nl >= 0:
        start += nl + 1
        break
    f.seek(start)
    try:
      json.loads(f.read(size - start).decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both.
      f.truncate(start)
      return
    f.seek(size)
    f.write(b"\n")


class MetricsWriter:
  """Writes one JSON object per logged step to ``workdir/metrics.jsonl``.

  Lines are strict JSON (``encode_row``: NaN and infinities are null, named in the
  row's ``_nonfinite``); ``read_rows`` reads them back with the floats restored.

  TensorBoard event files go to ``workdir/tensorboard`` when enabled (tensorboardX,
  so no TensorFlow is needed).

  Args:
    keep_through_step: a resumed run passes its restored step: rows of later steps
      (written before the restart, trained again now) are dropped so no step repeats.
      TensorBoard event files are append-only: the new event file starts with a purge
      marker (a ``SessionLog.START`` at the next step) that makes TensorBoard drop the
      earlier files' events from that step on.
    enabled: False writes nothing (``write`` still returns the row): the processes of a
      multi-host run other than the first, which share the workdir.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, filename: str = "metrics.jsonl",
               keep_through_step: int | None = None, enabled: bool = True):
    self.path = os.path.join(workdir, filename)
    self._file = self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if keep_through_step is not None:
      truncate_rows(self.path, keep_through_step)
    else:
      _end_last_line(self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      purge_step = None if keep_through_step is None else keep_through_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

  def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
    """Writes scalar metrics (arrays of size 1 or python numbers) for a step.

    Returns:
      The row as floats (non-finite values kept), as TensorBoard receives it.
    """
    row = {"step": int(step)}
    for k, v in metrics.items():
      # np.size of a str, None or dict is 1: float() then failed without naming the
      # metric, or read a digit string ("3") as a number.
      if isinstance(v, (str, bytes, dict)) or v is None:
        raise TypeError(f"metric {prefix + k!r} must be a number or an array of size 1, "
                        f"got {type(v).__name__} {v!r}")
      if np.size(v) == 1:
        try:
          row[prefix + k] = _scalar(v)
        except (TypeError, ValueError) as e:
          raise TypeError(f"metric {prefix + k!r} must be a real number, got "
                          f"{type(v).__name__} {v!r}") from e
    if self._file is None:
      return row
    self._file.write(encode_row(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, int(step))
    return row

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  """H:MM:SS, hours unbounded (a strftime of it would wrap at 24 hours)."""
  s = int(seconds)
  return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """A console progress line with rate and ETA.

  Either call ``print(done, extra)`` at chosen points (the trainer), or count with
  ``update(n)``, which prints at most every ``interval_s`` seconds and at the end.
  """

  def __init__(self, total: int, start: int = 0, unit: str = "step", stream=None,
               label: str = "", interval_s: float = 5.0):
    self.total, self.start, self.unit, self.label = total, start, unit, label
    self.interval_s = interval_s
    self.done = start
    self.t0 = self._last = time.time()
    self.stream = stream  # None = silent.

  def rate(self, done: int) -> float:
    """Items per second since the start; 0 (unknown) before any time has passed."""
    elapsed = time.time() - self.t0
    # A 1e-9 floor reported billions of steps/s on a coarse clock (elapsed 0).
    return (done - self.start) / elapsed if elapsed > 0 else 0.0

  def line(self, done: int, extra: str = "") -> str:
    rate = self.rate(done)
    left = max(self.total - done, 0)
    # Nothing left is 0 seconds away even when no rate is known (a resumed, finished run).
    eta = 0.0 if not left else left / rate if rate > 0 else float("inf")
    pct = 100.0 * done / max(self.total, 1)
    eta_s = _duration(eta) if np.isfinite(eta) else "?"
    label = f"{self.label} " if self.label else ""
    return (f"[{label}{done}/{self.total} {pct:5.1f}%] {rate:.2f} {self.unit}/s "
            f"ETA {eta_s} {extra}").rstrip()

  def print(self, done: int, extra: str = ""):
    if self.stream:
      print(self.line(done, extra), file=self.stream, flush=True)

  def update(self, n: int = 1) -> None:
    """Counts ``n`` more items done; prints when due."""
    self.done += n
    now = time.time()
    if self.done >= self.total or now - self._last >= self.interval_s:
      self._last = now
      self.print(self.done)
