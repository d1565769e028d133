"""The training loop: resume equivalence, NaN handling, metrics, gradient accumulation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax import config as config_lib
from blockdiff_jax.data import pipeline
from blockdiff_jax.model import build
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
from conftest import sgd_steps_by_accumulation


def _small(cfg, steps):
  cfg.data.max_bytes = 40_000
  cfg.data.seq_len = 32
  cfg.data.batch_size = 4
  cfg.model.d_model = 32
  cfg.model.moe.expert_dim = 32
  cfg.train.steps = steps
  cfg.train.log_every = 2
  cfg.train.eval_every = 0
  cfg.train.checkpoint_every = 2
  cfg.train.async_checkpoints = False
  cfg.train.tensorboard = True
  return cfg


def _params(workdir):
  return inference.load_for_inference(workdir, use_ema=False)[3]


class Preempted(Exception):
  pass


def test_resume_gives_identical_parameters(tiny_config, tmp_path, monkeypatch):
  """A run of 4 steps equals one preempted after step 2 and restarted (same config)."""
  straight = str(tmp_path / "straight")
  resumed = str(tmp_path / "resumed")
  trainer.run(_small(tiny_config, 4), straight)
  original_next = pipeline.DatasetIterator.__next__

  def preempting_next(self):
    if self.get_state()["index"] == 2:  # The third batch: after the step-2 checkpoint.
      raise Preempted()
    return original_next(self)

  monkeypatch.setattr(pipeline.DatasetIterator, "__next__", preempting_next)
  with pytest.raises(Preempted):
    trainer.run(_small(tiny_config, 4), resumed)
  monkeypatch.setattr(pipeline.DatasetIterator, "__next__", original_next)
  assert checkpoints.Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 2
  trainer.run(_small(tiny_config, 4), resumed)  # Picks up at step 2 with the data position.
  a, b = _params(straight), _params(resumed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Metrics: JSONL rows with the promised fields, TensorBoard events, the config.
  rows = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("loss", "nelbo", "nelbo_bits_per_byte", "grad_norm", "learning_rate",
              "load_balance_loss", "router_z_loss", "unique_experts", "tokens_per_s", "mfu"):
    assert np.isfinite(rows[-1][key]), key
  assert os.listdir(os.path.join(straight, "tensorboard"))
  assert json.load(open(os.path.join(straight, "config.json")))["train"]["steps"] == 4


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_config, tmp_path,
                                                                    monkeypatch):
  make = step_lib.make_train_step

  def poisoned(*args, **kwargs):
    inner = make(*args, **kwargs)

    def train_step(state, batch, rng):
      # From step 3 on, poison the weights the step sees so the loss becomes NaN.
      bad = state.step >= 3
      state = state.replace(params=jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p),
                                                state.params))
      return inner(state, batch, rng)
    return train_step

  monkeypatch.setattr(step_lib, "make_train_step", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteError, match="NaN/Inf at step 4"):
    trainer.run(_small(tiny_config, 8), workdir)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 2
  params = _params(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_non_finite_step_leaves_state_unchanged(tiny_config):
  cfg = _small(tiny_config, 2)
  model, _ = build.build_model(cfg)
  obj = config_lib.objective(cfg, 259)
  tx = optimizer.make_optimizer(cfg.train)
  state = state_lib.create(build.init_params(model, 0), tx, False)
  apply = build.make_apply(model)

  def nan_apply(*args, **kwargs):  # A forward gone non-finite.
    logits, aux = apply(*args, **kwargs)
    return logits * jnp.nan, aux

  step = jax.jit(step_lib.make_train_step(nan_apply, obj, tx,
                                          optimizer.learning_rate_schedule(cfg.train)))
  batch = {"tokens": jnp.zeros((4, 32), jnp.int32), "loss_mask": jnp.ones((4, 32))}
  new, metrics = step(state, batch, jax.random.key(0))
  assert float(metrics["finite"]) == 0.0
  assert int(new.step) == 0
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(x, y)


def test_ema_of_frozen_weights_stays_bit_identical(tiny_config):
  """Only the embedding trains; every other weight's EMA must equal it exactly (sampling
  from the EMA of a LoRA run must see the pretrained base, not one an ulp away)."""
  cfg = _small(tiny_config, 2)
  model, _ = build.build_model(cfg)
  obj = config_lib.objective(cfg, 259)
  tx = optax.sgd(0.5)  # Zero gradients leave a weight exactly where it is.
  params = build.init_params(model, 0)
  trains = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: "embed" in jax.tree_util.keystr(path), p)
  step = jax.jit(step_lib.make_train_step(build.make_apply(model), obj, tx,
                                          optax.constant_schedule(0.5), ema_decay=0.9,
                                          trainable_mask=trains))
  state = state_lib.create(params, tx, True)
  batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 32), 0, 250),
           "loss_mask": jnp.ones((4, 32))}
  for i in range(4):
    state, _ = step(state, batch, jax.random.key(i))
  moved = frozen = 0
  for (path, p0), e, p in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    if "embed" in jax.tree_util.keystr(path):
      moved += int(np.any(np.asarray(e) != np.asarray(p0)))
    else:
      frozen += 1
      np.testing.assert_array_equal(np.asarray(p), np.asarray(p0))
      np.testing.assert_array_equal(np.asarray(e), np.asarray(p0), err_msg=str(path))
  assert moved >= 1 and frozen > 5


@pytest.mark.parametrize("objective", ["bd3", "fastdllm", "ar"])
def test_gradient_accumulation_matches_the_full_batch(tiny_config, objective):
  """Micro-batch 0 (rows 0 and 2) scores 4 tokens a row, micro-batch 1 scores 32, as SFT
  rows with long prompts do: the update must still be the full batch's, not a mean of
  the two micro-batches' means."""
  cfg = _small(tiny_config, 2)
  # Dense: MoE routing (capacity, load balance) depends on which rows share a forward.
  cfg.model.moe.num_experts = 0
  if objective != "bd3":
    cfg.diffusion.objective, cfg.diffusion.token_shift = objective, True
  assert cfg.data.seq_len == 32
  params, outs = sgd_steps_by_accumulation(cfg, [4, 32, 4, 32])
  np.testing.assert_allclose(outs[0][1]["nelbo"], outs[1][1]["nelbo"], rtol=1e-5)
  np.testing.assert_allclose(outs[0][1]["loss_tokens"], outs[1][1]["loss_tokens"])
  np.testing.assert_allclose(outs[0][1]["grad_norm"], outs[1][1]["grad_norm"], rtol=1e-4)
  grads = [[p - q for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(out[0].params))]
           for out in outs]
  scale = max(float(jnp.abs(g).max()) for g in grads[0])
  assert scale > 1e-3  # The step did update the parameters.
  for x, y in zip(*grads):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-3 * scale)


def test_ema_tracks_parameters(tiny_config, tmp_path):
  cfg = _small(tiny_config, 2)
  cfg.train.ema_decay = 0.5
  trainer.run(cfg, str(tmp_path / "ema"))
  _, _, _, ema = inference.load_for_inference(str(tmp_path / "ema"))
  raw = _params(str(tmp_path / "ema"))
  diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw))]
  assert max(diffs) > 0


def test_load_for_inference_falls_back_to_params_and_to_one_device(tiny_config, tmp_path):
  cfg = _small(tiny_config, 2)  # No EMA.
  cfg.model.moe.capacity_factor = 0.5  # Training may drop copies; inference must not.
  workdir = str(tmp_path / "run")
  trainer.run(cfg, workdir)
  # Asks for EMA (absent) on a mesh needing 2 devices (this process has one).
  wants = checkpoints.load_config(workdir)
  wants.mesh = mesh_lib.default_mesh_config()
  wants.mesh.data = 2
  wants.mesh.fsdp = 1
  config, model, _, params = inference.load_for_inference(workdir, wants, use_ema=True)
  assert config.get("mesh") is None
  assert config.model.moe.capacity_factor == model.cfg.moe.capacity_factor == 0.0
  assert wants.model.moe.capacity_factor == 0.5  # The caller's config is left as it was.
  raw = _params(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(raw)):
    np.testing.assert_array_equal(a, b)
    assert len(a.sharding.device_set) == 1


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_skips_norm_scales_and_biases_scanned_or_not(tiny_config, scan):
  """Scanned layers stack a (layers, d) norm scale: still a vector per layer, no decay;
  a q/k/v bias is (heads, head_dim): not a matrix either."""
  cfg = _small(tiny_config, 2)
  cfg.model.scan_layers, cfg.model.num_layers, cfg.model.qkv_bias = scan, 2, True
  model, _ = build.build_model(cfg)
  params = build.init_params(model, 0)
  mask = optimizer.decay_mask(params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  scales = [k for k in flat if k.endswith("['scale']")]
  # Two norms a layer (one stacked leaf each when scanned) and the final norm.
  assert len(scales) == (3 if scan else 5)
  assert max(p.ndim for p in jax.tree.leaves(params)) == (4 if scan else 3)
  assert not any(flat[k] for k in scales)
  biases = [k for k in flat if k.endswith("['bias']")]
  assert len(biases) == (3 if scan else 6) and not any(flat[k] for k in biases)
  assert all(v for k, v in flat.items() if "kernel" in k or "embedding" in k)


def test_progress_eta_counts_hours_past_a_day():
  from blockdiff_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  progress = metrics_writer.Progress(total=100_000)
  progress.t0 -= 10.0  # One step in ten seconds: 99,999 steps left take 277.8 hours.
  assert "ETA 277:46:" in progress.line(1)


def test_throughput_leaves_out_the_first_compiling_step(tiny_config, tmp_path, monkeypatch):
  """The first call compiles; a slow first step must not show in step_time_s or tokens/s."""
  import time  # pylint: disable=g-import-not-at-top
  make = step_lib.make_train_step
  slow_first_s = 3.0

  def slow_first(*args, **kwargs):
    inner = make(*args, **kwargs)
    calls = []

    def train_step(state, batch, rng):
      if not calls:  # Stands in for a long compile, deterministically.
        time.sleep(slow_first_s)
      calls.append(1)
      return inner(state, batch, rng)
    return train_step

  monkeypatch.setattr(step_lib, "make_train_step", slow_first)
  cfg = _small(tiny_config, 4)
  cfg.train.log_every = cfg.train.checkpoint_every = 4  # One window: steps 1 to 4.
  workdir = str(tmp_path / "rate")
  trainer.run(cfg, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  # With the slow step counted, the mean over 4 steps would be at least 3 s / 4.
  assert rows[-1]["step_time_s"] < slow_first_s / 4, rows[-1]
  assert rows[-1]["tokens_per_s"] == pytest.approx(
      cfg.data.batch_size * cfg.data.seq_len / rows[-1]["step_time_s"])


def test_validation_weighs_batches_by_the_tokens_they_score():
  """Two batches: mean loss 1.0 over 10 tokens and 3.0 over 30 -> 2.5 per token, not 2.0."""
  scored = {0: (1.0, 10.0), 1: (3.0, 30.0)}

  class Batches:
    def get_batch(self, i):
      return {"i": i}

  def eval_step(params, batch, rng):
    del params, rng
    loss, n = scored[batch["i"]]
    return {"nelbo": jnp.float32(loss), "loss_tokens": jnp.float32(n)}

  val = trainer.evaluate_nelbo(eval_step, None, Batches(), 2, seed=0)
  assert val["nelbo"] == pytest.approx(2.5)
  assert val["loss_tokens"] == 40.0
  # Objectives without a count: equal weights.
  plain = trainer.evaluate_nelbo(lambda p, b, r: {"nelbo": scored[b["i"]][0]}, None,
                                 Batches(), 2, seed=0)
  assert plain["nelbo"] == pytest.approx(2.0)
