"""Training loop hardening: LR schedule values, warmup clamp, TensorBoard on resume, MoE
under gradient accumulation."""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import metrics_writer
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
from conftest import sgd_steps_by_accumulation


def _train(steps, warmup, peak=2e-3, ratio=0.1):
  return ml_collections.ConfigDict(dict(
      learning_rate=peak, warmup_steps=warmup, steps=steps, min_lr_ratio=ratio, b1=0.9,
      b2=0.95, weight_decay=0.0, grad_clip=0.0, trainable="all"))


def _reference_lr(s, steps, warmup, peak, ratio):
  """Slow reference: update s is the (s+1)-th; linear ramp to the peak at the warmup-th,
  cosine to ratio * peak at the steps-th (warmup at most steps - 1)."""
  warmup, n = min(warmup, steps - 1), s + 1
  if n <= warmup:
    return peak * n / warmup
  progress = (n - warmup) / (steps - warmup)
  floor = ratio * peak
  return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("steps,warmup,ratio", [(10, 4, 0.1), (7, 1, 0.0), (12, 0, 0.5),
                                                (5, 5, 0.1), (3, 10, 0.2), (1, 3, 0.1)])
def test_learning_rate_schedule_matches_a_reference(steps, warmup, ratio):
  peak = 2e-3
  schedule = optimizer.learning_rate_schedule(_train(steps, warmup, peak, ratio))
  got = np.array([float(schedule(jnp.int32(s))) for s in range(steps)])
  want = np.array([_reference_lr(s, steps, warmup, peak, ratio) for s in range(steps)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
  used = min(warmup, steps - 1)
  assert got[0] > 0  # The first update moves the weights.
  if used:
    assert got[0] == pytest.approx(peak / used, rel=1e-6)
    assert got[used - 1] == pytest.approx(peak, rel=1e-6)
  assert got[-1] == pytest.approx(ratio * peak, rel=1e-6, abs=1e-12)


def test_first_optimizer_step_moves_the_weights():
  tx = optimizer.make_optimizer(_train(steps=10, warmup=4))
  params = {"w": jnp.ones((3, 2))}
  updates, _ = tx.update({"w": jnp.full((3, 2), 0.5)}, tx.init(params), params)
  # Adam's first update is lr * sign(g): the schedule's value at step 0.
  np.testing.assert_allclose(updates["w"], np.full((3, 2), -2e-3 / 4), rtol=1e-4)


class _Stop(Exception):
  pass


def test_warmup_longer_than_the_run_is_clamped_with_a_notice(tiny_config, tmp_path,
                                                            monkeypatch, capsys):
  def stop(*args, **kwargs):
    raise _Stop()

  # The notice comes before anything compiles: stop the run there.
  monkeypatch.setattr(step_lib, "make_sharded_train", stop)
  cfg = tiny_config
  cfg.data.max_bytes, cfg.data.seq_len, cfg.data.batch_size = 40_000, 32, 4
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every = 4, 10, 0
  with pytest.raises(_Stop):
    trainer.run(cfg, str(tmp_path / "clamp"))
  assert "train.warmup_steps=10 >= train.steps=4: warmup shortened to 3" in (
      capsys.readouterr().out)
  assert optimizer.warmup_steps_used(_train(steps=4, warmup=10)) == 3
  assert optimizer.warmup_steps_used(_train(steps=40, warmup=10)) == 10


def _tensorboard_scalars(logdir, tag):
  """{step: [values]} as TensorBoard reads tensorboardX's (version 2) event files: files
  in name order, and a ``SessionLog.START`` event at step s drops the events read so far
  whose step is >= s (TensorBoard's restart purge)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  kept = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data, i = open(path, "rb").read(), 0
    while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc.
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      if (event.HasField("session_log")
          and event.session_log.status == event_pb2.SessionLog.START):
        kept = [(s, v) for s, v in kept if s < event.step]
      kept += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  out = {}
  for s, v in kept:
    out.setdefault(s, []).append(v)
  return out


def test_resume_drops_later_steps_from_jsonl_and_tensorboard(tmp_path):
  """A run logged steps 1-3, crashed, and resumed from its step-2 checkpoint: step 3 is
  trained again, and each step must show once, with the resumed values."""
  workdir = str(tmp_path / "run")
  first = metrics_writer.MetricsWriter(workdir, keep_through_step=0)
  for s in (1, 2, 3):
    first.write(s, {"loss": float(s)})
  first.close()
  # Event files are named by the second they were opened in: give the crashed attempt's
  # an earlier one, as a real restart would.
  (old,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  os.rename(old, os.path.join(workdir, "tensorboard", "events.out.tfevents.0000000001.old"))
  resumed = metrics_writer.MetricsWriter(workdir, keep_through_step=2)
  for s in (3, 4):
    resumed.write(s, {"loss": 10.0 * s})
  resumed.close()
  want = {1: [1.0], 2: [2.0], 3: [30.0], 4: [40.0]}
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["step"]: [r["loss"]] for r in rows} == want and len(rows) == 4
  assert _tensorboard_scalars(os.path.join(workdir, "tensorboard"), "loss") == want


def test_moe_gradient_accumulation_matches_the_full_batch_when_dropless_without_aux(
    tiny_config):
  """Without the load-balance and z-losses a dropless MoE step is row-separable, so two
  micro-batches scoring 4 and 32 tokens a row give the full batch's update."""
  cfg = tiny_config
  cfg.data.seq_len, cfg.data.batch_size = 32, 4
  cfg.model.d_model, cfg.model.moe.expert_dim = 32, 32
  cfg.model.moe.capacity_factor = 0.0
  cfg.model.moe.load_balance_weight = cfg.model.moe.z_loss_weight = 0.0
  assert cfg.model.moe.num_experts > 1
  params, outs = sgd_steps_by_accumulation(cfg, [4, 32, 4, 32])
  np.testing.assert_allclose(outs[0][1]["nelbo"], outs[1][1]["nelbo"], rtol=1e-6)
  np.testing.assert_allclose(outs[0][1]["grad_norm"], outs[1][1]["grad_norm"], rtol=1e-5)
  grads = [[p - q for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(out[0].params))]
           for out in outs]
  scale = max(float(jnp.abs(g).max()) for g in grads[0])
  assert scale > 1e-3
  # With the default aux weights the two differ by ~2e-3 of the scale.
  for x, y in zip(*grads):
    np.testing.assert_allclose(x, y, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("objective", ["bd3", "fastdllm", "introspective", "ar"])
def test_accumulation_with_a_micro_batch_scoring_nothing_matches_the_full_batch(objective):
  # With 2 micro-batches, micro-batch 0 takes rows 0 and 2, which score no token. It
  # must weigh 0, as in the full batch: an objective that clamped its count to 1
  # weighed it as one token and shrank the step by n / (n + 1).
  cfg = config_lib.base_config()
  cfg.data.seq_len, cfg.data.batch_size = 32, 4
  cfg.model.d_model, cfg.model.moe.num_experts = 32, 0
  cfg.diffusion.objective = objective
  cfg.diffusion.token_shift = objective != "bd3"
  # The noise is drawn for the full batch either way.
  _, ((want_state, want), (state, m)) = sgd_steps_by_accumulation(cfg, [0, 32, 0, 20])
  assert float(m["loss_tokens"]) == float(want["loss_tokens"]) > 0
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)))
  assert diff < 1e-5 * max(float(want["grad_norm"]), 1.0), diff


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tiny_config, tmp_path, capsys):
  cfg = tiny_config
  cfg.data.max_bytes, cfg.data.seq_len, cfg.data.batch_size = 40_000, 32, 2
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every = 2, 1, 0
  trainer.run(cfg, str(tmp_path / "done"))
  capsys.readouterr()
  trainer.run(cfg, str(tmp_path / "done"))
  out = capsys.readouterr().out
  assert "nothing to train: the checkpoint is at step 2 and train.steps=2" in out
  assert "first step" not in out  # No step ran.
