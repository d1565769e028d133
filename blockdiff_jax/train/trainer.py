"""The training loop: data → model → BD3-LM objective → optimizer → checkpoints → metrics."""

import contextlib
import json
import math
import os
import sys
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from blockdiff_jax import config as config_lib
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import tokenizers
from blockdiff_jax.evaluation import hardware
from blockdiff_jax.model import flops
from blockdiff_jax.model import masks
from blockdiff_jax.model import transformer
from blockdiff_jax.train import checkpoints
from blockdiff_jax.train import metrics_writer
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import partitioning
from blockdiff_jax.train import state as state_lib
from blockdiff_jax.train import step as step_lib


class NonFiniteError(FloatingPointError):
  """Raised when a step's loss or gradient is NaN/Inf."""


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (written by ``run``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def init_params(model: transformer.Transformer, seed: int, length: int = 8) -> Any:
  """fp32 parameters, unboxed from their logical-axis metadata."""
  tokens = jnp.zeros((1, length), jnp.int32)
  meta = masks.make_meta(jnp.arange(length)[None], 1, masks.CLEAN)
  return jax.jit(lambda: nn.unbox(model.init(jax.random.key(seed), tokens, meta)["params"]))()


def make_apply(model: transformer.Transformer):
  def apply_fn(params, tokens, meta, **kwargs):
    return model.apply({"params": params}, tokens, meta, **kwargs)
  return apply_fn


def evaluate_nelbo(eval_step, params, dataset, num_batches: int, seed: int,
                   put_batch=lambda b: b) -> dict:
  """Mean validation metrics over the first ``num_batches`` batches (fixed noise)."""
  totals = {}
  for i in range(num_batches):
    m = eval_step(params, put_batch(dataset.get_batch(i)), jax.random.key(seed + i))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v) / num_batches
  return totals


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the model described by ``config`` in ``workdir``.

  Returns the last logged metrics (and the last validation metrics, prefixed ``val_``).
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  save_config(config, workdir)
  t, d = config.train, config.data
  tokenizer = tokenizers.get_tokenizer(d, workdir)
  train_ds = pipeline.build_dataset(d, tokenizer, "train", d.seq_len, d.batch_size, config.seed)
  val_ds = None
  if t.eval_every:
    val_ds = pipeline.build_dataset(d, tokenizer, "validation", d.seq_len, d.batch_size,
                                    config.seed)

  mcfg = config_lib.model_config(config, tokenizer.vocab_size)
  model = transformer.Transformer(mcfg)
  apply_fn = make_apply(model)
  obj = config_lib.objective(config, tokenizer.mask_id)
  tx = optimizer.make_optimizer(t)
  lr_schedule = optimizer.learning_rate_schedule(t)
  sharded = None
  if config.get("mesh") is not None:
    # Params and optimizer state are created in their shards (ZeRO-3/TP/EP rules).
    sharded = partitioning.make_sharded_train(
        config, partitioning.make_mesh(config.mesh), model, obj, tx, lr_schedule)
    state = sharded.init_state(config.seed)
    print(f"mesh: {dict(sharded.mesh.shape)}", flush=True)
  else:
    state = state_lib.create(init_params(model, config.seed), tx, t.ema_decay > 0)
  counts = flops.param_counts(mcfg)
  logging.info("parameters: %s", counts)
  print(f"model: {counts['total']:,} parameters ({counts['active']:,} active per token)",
        flush=True)

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints,
                                  t.async_checkpoints)
  data_it = train_ds.iterator(0)
  if ckpt.latest_step() is not None:
    abstract = sharded.abstract_state if sharded else checkpoints.abstract_like(state)
    state, data_state = ckpt.restore(abstract)
    data_it.set_state(data_state)
    print(f"resumed from step {int(state.step)} ({ckpt.directory})", flush=True)

  if sharded is not None:
    train_step, eval_step = sharded.train_step, sharded.eval_step
    put_batch = sharded.put_batch
  else:
    train_step = step_lib.jit_train_step(step_lib.make_train_step(
        apply_fn, obj, tx, lr_schedule, t.grad_accum_steps, t.ema_decay))
    eval_step = jax.jit(step_lib.make_eval_step(apply_fn, obj))
    put_batch = lambda b: b
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  step_flops = flops.train_step_flops(mcfg, d.batch_size, d.seq_len)
  peak, peak_how = hardware.peak_flops(config.model.dtype)
  writer = metrics_writer.MetricsWriter(workdir, t.tensorboard)
  start = int(state.step)
  progress = metrics_writer.Progress(t.steps, start, stream=sys.stdout)
  bits = 1.0 / math.log(2)
  unigram = train_ds.unigram_entropy_bits
  print(f"data: {train_ds.bytes_per_token:.3f} bytes/token, unigram entropy "
        f"{unigram:.3f} bits/token; peak {peak / 1e9:.1f} GFLOP/s ({peak_how})", flush=True)

  last, last_val = {}, {}
  window_t0, window_steps = time.time(), 0

  def check_finite(step_done, metrics):
    if float(metrics["finite"]) == 0.0:
      raise NonFiniteError(
          f"loss or gradient is NaN/Inf at step {step_done}; the update was dropped and the "
          f"last checkpoint (step {ckpt.latest_step()}) is intact")

  pending = None  # The previous step's metrics, read one step late to keep dispatch async.
  try:
    for step in range(start, t.steps):
      batch = put_batch(next(data_it))
      state, metrics = train_step(state, batch, base_rng)
      window_steps += 1
      if pending is not None:
        check_finite(*pending)
      done = step + 1
      pending = (done, metrics)
      log_due = done % t.log_every == 0 or done == t.steps
      eval_due = val_ds is not None and (done % t.eval_every == 0 or done == t.steps)
      save_due = done % t.checkpoint_every == 0 or done == t.steps
      if log_due or eval_due or save_due:
        # Never log, evaluate or checkpoint a state whose last update was dropped.
        metrics = jax.device_get(metrics)
        check_finite(done, metrics)
      if log_due:
        step_time = (time.time() - window_t0) / window_steps
        row = dict(metrics)
        row.update({
            "nelbo_bits_per_byte": float(metrics["nelbo"]) * bits / train_ds.bytes_per_token,
            "tokens_per_s": d.batch_size * d.seq_len / step_time,
            "step_time_s": step_time,
            "mfu": step_flops / step_time / peak,
        })
        last = writer.write(done, row)
        window_t0, window_steps = time.time(), 0
        progress.print(done, f"loss {last['loss']:.4f} nelbo {last['nelbo']:.4f} "
                       f"({last['nelbo_bits_per_byte']:.3f} bits/byte) "
                       f"{last['tokens_per_s']:.0f} tok/s mfu {100 * last['mfu']:.1f}%")
      if eval_due:
        params = state.ema_params if state.ema_params is not None else state.params
        val = evaluate_nelbo(eval_step, params, val_ds, t.eval_batches, config.seed, put_batch)
        val["nelbo_bits_per_byte"] = val["nelbo"] * bits / val_ds.bytes_per_token
        val["unigram_entropy_bits_per_byte"] = val_ds.unigram_entropy_bits / val_ds.bytes_per_token
        last_val = writer.write(done, val, prefix="val_")
        print(f"  validation nelbo {val['nelbo']:.4f} nats/token = "
              f"{val['nelbo_bits_per_byte']:.3f} bits/byte (unigram entropy "
              f"{val['unigram_entropy_bits_per_byte']:.3f} bits/byte)", flush=True)
      if save_due:
        ckpt.save(done, state, data_it.get_state())
      if eval_due or save_due:
        # Keep evaluation and checkpoint time out of the throughput figures.
        jax.block_until_ready(state)
        window_t0, window_steps = time.time(), 0
  finally:
    ckpt.close()
    writer.close()
  return {**last, **last_val}


def build_model(config: ml_collections.ConfigDict, workdir: str | None = None):
  """(model, tokenizer) of a config; the tokenizer may come from the workdir (BPE)."""
  config_lib.validate(config)
  tokenizer = tokenizers.get_tokenizer(config.data, workdir)
  model = transformer.Transformer(config_lib.model_config(config, tokenizer.vocab_size))
  return model, tokenizer


def inference_context(config: ml_collections.ConfigDict):
  """``with trainer.inference_context(config):`` the config's mesh and rules, if it has one.

  Sampling and evaluation run inside it, so the model's MoE dispatch and layout
  constraints see the mesh the params were restored onto (``load_for_inference``).
  """
  if config.get("mesh") is None:
    return contextlib.nullcontext()
  return partitioning.mesh_context(partitioning.make_mesh(config.mesh),
                                   partitioning.logical_rules(config.mesh))


def load_for_inference(workdir: str, config: ml_collections.ConfigDict | None = None,
                       step: int | None = None, use_ema: bool = True):
  """Loads (config, model, tokenizer, params) from a training workdir.

  Only the parameters are read (Orbax partial restore through tensorstore; the
  optimizer state stays on disk), laid out on ``config.mesh`` when the config has
  one (each device reads its own shards) and on one device otherwise (also when
  the mesh's fixed axes need more devices than this machine has; the returned
  config then has no mesh).

  Args:
    workdir: a directory written by ``run``.
    config: overrides the saved config (e.g. to switch the attention implementation
      or the mesh); architecture fields must match the checkpoint.
    step: checkpoint step; None = the latest.
    use_ema: return the EMA parameters when the run kept them.
  """
  config = load_config(workdir) if config is None else config
  model, tokenizer = build_model(config, workdir)
  boxed = partitioning.abstract_params(model)
  shapes = nn.unbox(boxed)
  mesh = None
  if config.get("mesh") is not None:
    try:
      mesh = partitioning.make_mesh(config.mesh)
    except ValueError as e:
      # E.g. a run trained on 8 devices, sampled on 1: the fixed mesh axes don't fit.
      print(f"config.mesh does not fit this machine ({e}); loading onto one device",
            flush=True)
      config = config.copy_and_resolve_references()
      del config.mesh
  if mesh is not None:
    shardings = partitioning.param_shardings(boxed, mesh, partitioning.logical_rules(
        config.mesh))
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  params = partitioning.restore_params(
      os.path.join(workdir, "checkpoints"), abstract, step,
      subtree="ema_params" if use_ema else "params", fallback_subtree="params")
  return config, model, tokenizer, params
