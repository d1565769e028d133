"""Training loop hardening: throughput on a clock that reads no time, and the result of
rerunning a finished run (with the cadence of its rows and checkpoints)."""

import json
import math
import os
import types

import jax.numpy as jnp
import pytest

from blockdiff_jax import metrics_writer
from blockdiff_jax.train import trainer
from conftest import small_run_config


def _config(steps):
  return small_run_config(steps, checkpoint_every=steps)


def _strict_rows(workdir):
  """metrics.jsonl parsed as strict JSON (a bare NaN or Infinity token raises)."""
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


class _Clock:
  """A clock of ``time.time`` and ``time.perf_counter`` that stands still or runs back."""

  def __init__(self, step):
    self.now, self.step = 1000.0, step

  def __call__(self):
    self.now += self.step
    return self.now


@pytest.mark.parametrize("step", [0.0, -0.5], ids=["frozen", "backwards"])
def test_a_clock_that_measures_no_time_logs_unknown_throughput(tmp_path, monkeypatch, capfd,
                                                              step):
  # A coarse clock reads 0 s for a fast step (ZeroDivisionError ended the run), and a
  # wall clock set back (NTP) gave negative tokens/s and MFU.
  clock = _Clock(step)
  monkeypatch.setattr(trainer, "time", types.SimpleNamespace(time=clock, perf_counter=clock))
  workdir = str(tmp_path / "run")
  out = trainer.run(_config(2), workdir)
  rows = _strict_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  for row in metrics_writer.read_rows(os.path.join(workdir, "metrics.jsonl")):
    for key in ("tokens_per_s", "mfu"):
      assert math.isnan(row[key]), (key, row[key])  # No time passed: unknown.
  assert math.isfinite(out["loss"])
  printed = "".join(capfd.readouterr())
  assert "? tok/s mfu ?%" in printed and "nan" not in printed, printed


def test_rerunning_a_finished_run_returns_its_final_metrics_and_adds_no_row(tmp_path):
  # Steps not a multiple of any interval: logged at 2, 4 and 5, evaluated at 3 and 5,
  # checkpointed at 2, 4 and 5, each once.
  c = _config(5)
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.eval_batches = 1
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 5
  workdir = str(tmp_path / "run")
  first = trainer.run(c, workdir)
  rows = _strict_rows(workdir)
  assert [(r["step"], "val_nelbo" in r) for r in rows] == [
      (2, False), (3, True), (4, False), (5, False), (5, True)]
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                 if n.isdigit())
  assert steps == [2, 4, 5]
  assert first["step"] == 5 and "val_nelbo" in first and "nelbo" in first
  # The same command again (train.steps already reached) trains nothing and returned {}:
  # a sweep script reading result["val_nelbo"] failed with KeyError on a rerun.
  again = trainer.run(c, workdir)
  assert _strict_rows(workdir) == rows
  assert again == first


def test_validation_weighs_masked_metrics_by_the_masked_tokens():
  """BD3-LM's masked_ce is a mean over masked tokens: batch 0 masks 2 of 10 scored tokens
  (ce 1.0), batch 1 masks 30 of 30 (ce 3.0): (2*1 + 30*3) / 32, not the scored-token mean."""
  from blockdiff_jax.diffusion import losses  # pylint: disable=g-import-not-at-top
  rows = {0: (1.0, 10.0, 0.2), 1: (3.0, 30.0, 1.0)}

  class Batches:
    def get_batch(self, i):
      return {"i": i}

  def eval_step(params, batch, rng):
    del params, rng
    ce, n, frac = rows[batch["i"]]
    return {"nelbo": jnp.float32(ce), "masked_ce": jnp.float32(ce),
            "masked_fraction": jnp.float32(frac), "loss_tokens": jnp.float32(n)}

  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=0)
  val = trainer.evaluate_nelbo(eval_step, None, Batches(), 2, seed=0, obj=obj)
  assert val["masked_ce"] == pytest.approx((2 * 1.0 + 30 * 3.0) / 32)
  assert val["nelbo"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)  # Per scored token.
  assert val["loss_tokens"] == 40.0
