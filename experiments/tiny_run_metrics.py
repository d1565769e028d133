r"""Logged metrics of a short tiny-config run, without and with a mesh, as JSON.

A behaviour check for refactors: run it before and after, then compare.

  python experiments/tiny_run_metrics.py --out /tmp/before.json
  python experiments/tiny_run_metrics.py --out /tmp/after.json --compare /tmp/before.json

Timing fields (tokens/s, step time, MFU) are dropped; everything else in
``metrics.jsonl`` (losses, NELBO, grad norm, MoE statistics, validation) is kept. A NaN
or infinite value is written as null (strict JSON), so it compares equal to itself.
"""

import argparse
import importlib.util
import json
import os
import shutil
import tempfile

TIMING = ("tokens_per_s", "step_time_s", "mfu", "time")


def run(steps: int = 6) -> dict:
  """{"nomesh": rows, "mesh": rows} of a ``steps``-step tiny run each."""
  from blockdiff_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("tiny", path)
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  out = {}
  for name in ("nomesh", "mesh"):
    c = tiny.get_config()
    c.train.update(steps=steps, log_every=2, eval_every=3, checkpoint_every=3,
                   tensorboard=False)
    c.data.max_bytes = 50_000
    if name == "mesh":
      c.mesh = mesh_lib.default_mesh_config()
    workdir = tempfile.mkdtemp(prefix=f"tiny_{name}_")
    try:
      trainer.run(c, workdir)
      rows = metrics_writer.read_rows(os.path.join(workdir, "metrics.jsonl"))
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    out[name] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
  return out


def compare(a: dict, b: dict) -> list[str]:
  """Human-readable differences (run, step, field, old, new)."""
  diffs = [f"{run_name}: only in the new run" for run_name in b if run_name not in a]
  for run_name in a:
    if len(a[run_name]) != len(b.get(run_name, [])):
      diffs.append(f"{run_name}: {len(a[run_name])} rows vs {len(b.get(run_name, []))}")
    for ra, rb in zip(a[run_name], b.get(run_name, [])):
      for k in sorted(set(ra) | set(rb)):
        if ra.get(k) != rb.get(k):
          diffs.append(f"{run_name} step {ra.get('step')} {k}: {ra.get(k)!r} -> {rb.get(k)!r}")
  return diffs


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="Where the metrics JSON goes.")
  ap.add_argument("--compare", default="", help="A previous output to compare with.")
  ap.add_argument("--steps", type=int, default=6)
  args = ap.parse_args()
  if args.steps < 1:
    ap.error(f"--steps={args.steps} must be >= 1")
  from blockdiff_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  before = None
  if args.compare:
    # Read before the run: a missing file fails now, not after it, and --out naming the
    # same file (rerun in place) no longer compares the new run with itself.
    try:
      with open(args.compare, encoding="utf-8") as f:  # Older files may hold bare NaN.
        before = metrics_writer.finite_or_none(json.load(f))
    except (OSError, ValueError) as e:
      ap.error(f"--compare={args.compare!r}: {e}")
  # Before the run: a new folder in --out used to fail the write after both runs.
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  # NaN != NaN: a diverged loss in both runs would be reported as a difference.
  result = metrics_writer.finite_or_none(run(args.steps))
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, sort_keys=True, allow_nan=False)
  if before is not None:
    diffs = compare(before, result)
    values = sum(len(r) for rows in result.values() for r in rows)
    print(f"{len(diffs)} of {values} logged values differ")
    print("\n".join(diffs))


if __name__ == "__main__":
  main()
