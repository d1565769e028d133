"""The training loop: data → model → BD3-LM objective → optimizer → checkpoints → metrics."""

import dataclasses
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
import jax
import flax.linen as nn
import ml_collections
import numpy as np

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.checkpoint import workdir_lock
from blockdiff_jax.data import pipeline
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax import metrics_writer
from blockdiff_jax.model import build
from blockdiff_jax.model import flops
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.train import config as train_config
from blockdiff_jax.train import hardware
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import step as step_lib


class NonFiniteError(FloatingPointError):
  """Raised when a step's loss or gradient is NaN/Inf."""


class TrainingInterrupted(SystemExit):
  """SIGTERM or SIGINT stopped ``run`` between steps, after it saved a checkpoint.

  A ``SystemExit`` with code 128 + the signal number (143 for SIGTERM, 130 for
  Ctrl-C), so the command line exits with that status and no traceback.

  Attributes:
    signum: the signal that stopped the run.
    step: the step the run stopped at (its checkpoint holds this step, unless no
      step was trained since the run started).
  """

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(128 + signum)
    self.signum, self.step, self.message = signum, step, message

  def __str__(self) -> str:
    return self.message


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a request the loop honours between steps.

  The handlers only record the first signal, so the step in flight, the checkpoint
  write and the metrics files are never cut mid-way. A second signal while stopping is
  ignored (with a note on stderr): aborting would only lose the checkpoint being
  written; ``kill -9`` still ends the process at once, and Orbax writes each
  checkpoint to a temporary folder renamed when complete, so the previous one stays
  usable. Handlers are installed only from the main thread (``signal.signal`` refuses
  elsewhere), never over a signal that is ignored (``nohup``, background jobs) or
  whose handler Python cannot name (``getsignal`` gives None: it could not be put
  back), and ``restore`` puts the previous ones back.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signum is None:
      self.signum = signum
      note = (f"{name} received: finishing the step in flight, then saving a checkpoint "
              "and stopping (further signals are ignored; kill -9 abandons the save)")
    else:
      note = f"{name} ignored: already stopping, the checkpoint is being saved"
    os.write(2, f"\n{note}\n".encode())  # Not print(): the loop may be mid-print.

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for signum in STOP_SIGNALS:
      previous = signal.getsignal(signum)
      if previous is None or previous == signal.SIG_IGN:
        continue
      self._previous[signum] = previous
      signal.signal(signum, self._handle)

  def restore(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def distinct_rows(dataset) -> int | None:
  """Rows of a finite split (None: an endless stream), as ``likelihood.distinct_rows``.

  A finite split's rows ``[0, n)`` hold each of its rows once; later rows repeat them.
  (The trainer sits below ``evaluation`` in the import order, so it keeps its own copy.)
  """
  for name in ("num_windows", "num_rows", "num_examples"):
    n = getattr(dataset, name, None)
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0:
      return int(n)
  return None


def _unscore_rows_from(batch: dict, first: int) -> dict:
  """``batch`` with rows ``first:`` counting nothing: ``loss_mask`` zeroed, and marked as
  padding (``segment_ids`` -1), which the MoE router statistics skip.

  A zeroed ``loss_mask`` alone kept the repeats out of the NELBO, but the load-balance
  and z-losses (so ``loss``, which adds them) still averaged over their tokens.
  """
  mask = np.array(batch["loss_mask"], copy=True)
  mask[first:] = 0
  seg = batch.get("segment_ids")
  seg = np.zeros(mask.shape, np.int32) if seg is None else np.array(seg, copy=True)
  seg[first:] = -1
  return {**batch, "loss_mask": mask, "segment_ids": seg}


def evaluate_nelbo(eval_step, params, dataset, num_batches: int, seed: int,
                   put_batch=lambda b: b, obj: Any = None) -> dict:
  """Validation: the training metrics over the first ``num_batches`` batches.

  Batches are weighed by the count their loss is a mean over (``losses.LOSS_TOKENS``), as
  gradient accumulation weighs micro-batches: SFT batches score different numbers of
  tokens, and a plain mean of their means would weigh a token of a sparse batch more.
  Objectives that do not report the count get equal weights. The noise of batch i is
  fixed (``seed + i``), so every evaluation scores the same draws. A finite split
  (``distinct_rows``) smaller than ``num_batches`` batches is scored once: reading
  stops after its last row, and the rows of the last batch past it (repeats of
  earlier rows) score nothing, so no row weighs double. Given the objective ``obj``, each
  metric is weighed by its own count (``step.metric_counts``: BD3-LM's masked metrics
  by the masked tokens), as accumulation weighs them.
  """
  distinct = distinct_rows(dataset)
  rows, first_row = [], 0
  for i in range(num_batches):
    if distinct is not None and first_row >= distinct:
      break
    batch = dataset.get_batch(i)
    if distinct is not None:
      if "segment_ids" not in batch:  # Every batch as the last one's: one compile.
        batch = {**batch, "segment_ids": np.zeros(np.shape(batch["loss_mask"]), np.int32)}
      if first_row + len(batch["loss_mask"]) > distinct:
        batch = _unscore_rows_from(batch, distinct - first_row)
      first_row += len(batch["loss_mask"])
    rows.append(jax.device_get(eval_step(params, put_batch(batch), jax.random.key(seed + i))))
  weights = [float(m.get(losses.LOSS_TOKENS, 1.0)) for m in rows]
  counts = ([step_lib.metric_counts(obj, m) for m in rows]
            if obj is not None and all(losses.LOSS_TOKENS in m for m in rows) else None)
  out = {}
  for k in rows[0]:
    w = weights if counts is None else [float(c[k]) for c in counts]
    if sum(w) <= 0:  # Nothing scored anywhere: equal weights rather than 0/0.
      w = [1.0] * len(rows)
    out[k] = sum(wi * float(m[k]) for wi, m in zip(w, rows)) / sum(w)
  if losses.LOSS_TOKENS in out:  # The count scored, not a weighed mean of it.
    out[losses.LOSS_TOKENS] = sum(float(m[losses.LOSS_TOKENS]) for m in rows)
  return out


def objective_step_flops(config: ml_collections.ConfigDict, mcfg, obj) -> float:
  """Model FLOPs of one train step of ``config``: the count MFU divides by.

  The objective decides how many tokens run forward (complementary masks, the I-DLM
  noisy tokens, one causal stream), and ``train.trainable`` which weight gradients the
  backward forms: with "lora" or "moe" the frozen weights enter through stop_gradient,
  so they form none (``flops.pass_flops``).

  Args:
    config: the run's config.
    mcfg: the model's ``TransformerConfig``.
    obj: the objective built for ``config`` (``diffusion_config.objective``).
  """
  d = config.data
  mode = config.train.get("trainable", "all")
  if isinstance(obj, introspective.IntrospectiveObjective):
    return flops.introspective_step_flops(
        mcfg, d.batch_size, d.seq_len, obj.anchors * obj.stride, obj.detach_clean, False,
        anchored=bool(obj.anchors), trainable=mode)
  if isinstance(obj, fastdllm.FastDLLMObjective):
    return flops.fastdllm_step_flops(mcfg, d.batch_size, d.seq_len, obj.complementary, False,
                                     trainable=mode)
  if isinstance(obj, autoregressive.AutoregressiveObjective):
    return flops.autoregressive_step_flops(mcfg, d.batch_size, d.seq_len, False,
                                           trainable=mode)
  return flops.train_step_flops(mcfg, d.batch_size, d.seq_len, trainable=mode)


def _check_resume_config(config: ml_collections.ConfigDict, workdir: str,
                         step: int) -> str | None:
  """Refuses a resume whose config changes the data, model or objective of ``workdir``.

  The checkpoint's data position indexes the saved config's dataset, so a resume with
  another corpus, batch or sequence length would silently train on other data. Allowed
  changes (``train_config.FIXED_ON_RESUME``) are kept: the previous ``config.json`` is
  moved to ``config.step<step>.json`` (unless that exists) before the new one is written.

  Returns:
    Where the previous ``config.json`` was moved (None when it stayed).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  refused, allowed = train_config.resume_changes(saved, config)
  if refused:
    raise ValueError(
        f"cannot resume {workdir} (checkpoint step {step}) with a config that changes its "
        "data stream, model, objective or optimizer state:\n  " + "\n  ".join(refused) +
        "\nRestore these values, or train in a new workdir (init_from.workdir starts from "
        "its weights).")
  if jax.process_index() != 0:
    return None  # The first process keeps the old config.
  kept = os.path.join(workdir, f"config.step{step}.json")
  moved = None
  if allowed and not os.path.exists(kept):
    os.replace(path, kept)
    moved = kept
  if allowed:
    print(f"resume with changed settings (previous config in {os.path.basename(kept)}): "
          + "; ".join(allowed), flush=True)
  return moved


def _read_config_json(workdir: str) -> bytes | None:
  """The bytes of ``workdir/config.json`` (None without one): what a failed resume puts back."""
  try:
    with open(os.path.join(workdir, "config.json"), "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def _put_back_config(workdir: str, previous: bytes | None, moved: str | None) -> None:
  """Undoes the config writes of a resume whose checkpoint did not restore, so that
  ``config.json`` (read by sampling, evaluation and the next resume) still describes the
  workdir's checkpoints, and no ``config.step<N>.json`` claims a config change that never
  trained."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  if moved is not None:
    os.replace(moved, path)
  elif previous is not None:
    with open(path + ".tmp", "wb") as f:
      f.write(previous)
    os.replace(path + ".tmp", path)


def _refused_fields(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The fields of ``config`` a resume of ``workdir`` refuses (none without a readable
  ``config.json``): what to name when its checkpoint does not fit the model."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      return train_config.resume_changes(json.load(f), config)[0]
  except (OSError, ValueError, TypeError, AttributeError):
    return []


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the model described by ``config`` in ``workdir``.

  One run at a time holds ``workdir`` (``workdir_lock``); a second one fails naming the
  holder. Returns the last logged metrics (and the last validation metrics, prefixed ``val_``);
  a run resumed at ``train.steps``, which trains nothing, returns those ``metrics.jsonl``
  holds (the run that got there logged them).
  In a multi-host run every process runs this with the same workdir: the first holds the
  lock and writes ``config.json`` and the metrics; Orbax writes the checkpoints together.

  Stopping: while the steps run, SIGTERM (a preemption, ``kill``) and SIGINT (Ctrl-C)
  let the step in flight finish, save a checkpoint of that step (unless one exists),
  close the metrics files, release the workdir, print one line saying so and raise
  ``TrainingInterrupted`` (exit status 128 + the signal). Running the same command again
  resumes exactly. A signal during the last step lets the run finish normally. The
  previous handlers are restored when ``run`` returns. A multi-process run cannot
  stop on one process's signal alone (the processes save together, at the same step),
  so there no handler is installed: SIGTERM to any process reaches JAX's preemption
  service (``jax.distributed.initialize`` starts it), which after every step is asked
  whether all processes agreed on a step to stop at; each saves it and raises as
  above (checked by hand with two processes; the suite does not run that). SIGINT
  there interrupts as Python does by default, without a save.
  """
  train_config.validate(config)
  try:
    if jax.process_index() != 0:
      return _run_locked(config, workdir)
    with workdir_lock.WorkdirLock(workdir):
      return _run_locked(config, workdir)
  except TrainingInterrupted as e:
    if jax.process_index() == 0:
      print(e.message, flush=True)  # Said once the workdir is released: rerunning works.
    raise


def _console():
  """Where progress goes: only the first process prints, so a multi-host log reads once."""
  return sys.stdout if jax.process_index() == 0 else None


def _say(*args, **kwargs):
  """``print`` on the first process only (every process runs the same loop)."""
  if jax.process_index() == 0:
    print(*args, **kwargs)


def _run_locked(config: ml_collections.ConfigDict, workdir: str) -> dict:
  # A pretrained start fixes the architecture and tokenizer before config.json is written.
  config, model, tokenizer = initial.build_model(config, workdir)
  t = config.train
  # This run holds the workdir: no other save can be in progress.
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints,
                                  t.async_checkpoints, remove_unfinished=True)
  resume = _ResumeWrites()
  try:
    return _train(config, workdir, model, tokenizer, ckpt, resume)
  except BaseException:
    # A resume that failed before its checkpoint restored (building data, compiling,
    # restoring) trained nothing under the new config: config.json goes back.
    if resume.written and not resume.restored:
      _put_back_config(workdir, resume.previous, resume.moved)
    raise
  finally:
    ckpt.close()  # Also when the run fails before its loop (a no-op after the loop's).


@dataclasses.dataclass
class _ResumeWrites:
  """The config writes of a resume, undone when it fails before its restore."""
  written: bool = False  # config.json was rewritten for a resume.
  previous: bytes | None = None  # Its bytes before.
  moved: str | None = None  # Where the previous one was moved (config.step<N>.json).
  restored: bool = False  # The checkpoint restored: the new config is the run's now.


def _train(config: ml_collections.ConfigDict, workdir: str, model: nn.Module, tokenizer,
           ckpt: checkpoints.Checkpointer, resume: _ResumeWrites) -> dict:
  """``_run_locked`` once the workdir's checkpoints are open (``ckpt``, closed by the caller)."""
  t, d = config.train, config.data
  # A resume with another architecture fails here, before compiling or writing anything.
  try:
    ckpt.check_params(nn.unbox(build.abstract_params(model)))
  except checkpoints.IncompatibleCheckpointError as e:
    fields = _refused_fields(config, workdir)
    if not fields:
      raise
    raise checkpoints.IncompatibleCheckpointError(
        f"{e}\nThe config changes these fields of {os.path.join(workdir, 'config.json')}:"
        "\n  " + "\n  ".join(fields) + "\nRestore them, or train in a new workdir "
        "(init_from.workdir starts from its weights).") from None
  if ckpt.latest_step() is not None:  # Every process refuses, or none does.
    resume.previous = _read_config_json(workdir)
    resume.moved = _check_resume_config(config, workdir, ckpt.latest_step())
    resume.written = True
  if jax.process_index() == 0:
    checkpoints.save_config(config, workdir)
  train_ds = pipeline.build_dataset(d, tokenizer, "train", d.seq_len, d.batch_size, config.seed,
                                    workdir)
  val_ds = None
  if t.eval_every:
    val_ds = pipeline.build_dataset(d, tokenizer, "validation", d.seq_len, d.batch_size,
                                    config.seed, workdir)
    val_rows = distinct_rows(val_ds)
    if val_rows is not None and val_rows < t.eval_batches * d.batch_size:
      _say(f"validation: the split has {val_rows} rows, fewer than train.eval_batches x "
           f"data.batch_size = {t.eval_batches * d.batch_size}: each evaluation scores "
           "them once", flush=True)

  mcfg = model.cfg
  obj = diffusion_config.objective(config, tokenizer.mask_id)
  tx = optimizer.make_optimizer(t)
  lr_schedule = optimizer.learning_rate_schedule(t)
  if optimizer.warmup_steps_used(t) != t.warmup_steps:
    _say(f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: warmup shortened "
          f"to {optimizer.warmup_steps_used(t)} steps so the last step still decays to "
          f"train.min_lr_ratio", flush=True)
  # Params and optimizer state are created in their shards (ZeRO-3/TP/EP rules);
  # a config without a mesh runs on a one-device mesh.
  mesh, rules = mesh_lib.mesh_of(config)
  sharded = step_lib.make_sharded_train(config, mesh, model, obj, tx, lr_schedule, rules)
  resuming = ckpt.latest_step() is not None
  # Pretrained weights only start a run: a checkpoint of this workdir wins.
  start_params = None if resuming else initial.initial_params(
      config, model, workdir, sharded.mesh, sharded.rules)
  state = sharded.init_state(config.seed, start_params)
  if config.get("mesh") is not None:
    _say(f"mesh: {dict(sharded.mesh.shape)}", flush=True)
    note = mesh_lib.expert_split_warning(mcfg.moe.num_experts if mcfg.moe else 0, sharded.mesh)
    if note:
      _say(note, flush=True)
  counts = flops.param_counts(mcfg)
  logging.info("parameters: %s", counts)
  _say(f"model: {counts['total']:,} parameters ({counts['active']:,} active per token)",
        flush=True)

  data_it = train_ds.iterator(0)
  if resuming:
    # The newest checkpoint that restores (corrupt newer ones are named and set aside).
    state, data_state = ckpt.restore(sharded.abstract_state)
    resume.restored = True
    data_it.set_state(data_state)
    _say(f"resumed from step {int(state.step)} ({ckpt.directory})", flush=True)
    if int(state.step) >= t.steps:
      _say(f"nothing to train: the checkpoint is at step {int(state.step)} and "
            f"train.steps={t.steps}; raise --config.train.steps to train on", flush=True)

  train_step, eval_step, put_batch = sharded.train_step, sharded.eval_step, sharded.put_batch
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  step_flops = objective_step_flops(config, mcfg, obj)
  peak, peak_how = hardware.peak_flops(config.model.dtype, list(sharded.mesh.devices.flat))
  start = int(state.step)
  # Steps after ``start`` are trained again: drop their rows from an earlier attempt.
  writer = metrics_writer.MetricsWriter(workdir, t.tensorboard, keep_through_step=start,
                                       enabled=jax.process_index() == 0)
  progress = metrics_writer.Progress(t.steps, start, stream=_console())
  bits = 1.0 / math.log(2)
  # Every objective reports its loss as "nelbo"; only BD3-LM's is an ELBO bound.
  loss_name = {"bd3": "nelbo", "fastdllm": "masked ce", "introspective": "noisy ce",
               "ar": "ar ce"}.get(config.diffusion.get("objective", "bd3"), "loss")
  unigram = train_ds.unigram_entropy_bits
  _say(f"data: {train_ds.bytes_per_token:.3f} bytes/token, unigram entropy "
        f"{unigram:.3f} bits/token; peak {peak / 1e9:.1f} GFLOP/s ({peak_how})", flush=True)

  last, last_val = {}, {}
  # Durations come from the monotonic clock: a wall-clock step (NTP) gave negative times.
  window_t0, window_steps = time.perf_counter(), 0

  def check_finite(step_done, metrics):
    if float(metrics["finite"]) == 0.0:
      last_step = ckpt.latest_step()
      kept = (f"the last checkpoint (step {last_step}) is intact" if last_step is not None
              else "no checkpoint has been written yet")
      raise NonFiniteError(f"loss or gradient is NaN/Inf at step {step_done}; the update "
                           f"was dropped and {kept}")

  pending = None  # The previous step's metrics, read one step late to keep dispatch async.
  done = start
  multi_process = jax.process_count() > 1
  stop = _StopRequest()
  if not multi_process:
    stop.install()
  try:
    for step in range(start, t.steps):
      if stop.signum is not None:
        break
      batch = put_batch(next(data_it))
      state, metrics = train_step(state, batch, base_rng)
      window_steps += 1
      if step == start:
        # The first step compiles: keep it out of the throughput figures and the ETA.
        jax.block_until_ready(metrics)
        first_step_s = time.perf_counter() - window_t0
        _say(f"first step (compile included): {first_step_s:.1f}s", flush=True)
        window_t0, window_steps = time.perf_counter(), 0
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
        # A window holding only the first step has nothing but that (compiling) step.
        step_time = ((time.perf_counter() - window_t0) / window_steps if window_steps
                     else first_step_s)
        row = dict(metrics)
        row.update({
            "nelbo_bits_per_byte": float(metrics["nelbo"]) * bits / train_ds.bytes_per_token,
            "step_time_s": step_time,
            **_throughput(d.batch_size * d.seq_len, step_flops, step_time, peak),
        })
        last = writer.write(done, row)
        window_t0, window_steps = time.perf_counter(), 0
        tps, mfu = last["tokens_per_s"], 100 * last["mfu"]  # NaN: no time measured.
        progress.print(done, f"loss {last['loss']:.4f} {loss_name} {last['nelbo']:.4f} "
                       f"({last['nelbo_bits_per_byte']:.3f} bits/byte) "
                       f"{f'{tps:.0f}' if math.isfinite(tps) else '?'} tok/s mfu "
                       f"{f'{mfu:.1f}' if math.isfinite(mfu) else '?'}%")
      if eval_due:
        params = state.ema_params if state.ema_params is not None else state.params
        val = evaluate_nelbo(eval_step, params, val_ds, t.eval_batches, config.seed, put_batch,
                             obj)
        val["nelbo_bits_per_byte"] = val["nelbo"] * bits / val_ds.bytes_per_token
        val["unigram_entropy_bits_per_byte"] = val_ds.unigram_entropy_bits / val_ds.bytes_per_token
        last_val = writer.write(done, val, prefix="val_")
        _say(f"  validation {loss_name} {val['nelbo']:.4f} nats/token = "
              f"{val['nelbo_bits_per_byte']:.3f} bits/byte (unigram entropy "
              f"{val['unigram_entropy_bits_per_byte']:.3f} bits/byte)", flush=True)
      if save_due:
        ckpt.save(done, state, data_it.get_state())
      if eval_due or save_due:
        # Keep evaluation and checkpoint time out of the throughput figures.
        jax.block_until_ready(state)
        window_t0, window_steps = time.perf_counter(), 0
      if step == start:  # The ETA counts from the end of the compiling first step.
        progress = metrics_writer.Progress(t.steps, done, stream=_console())
      if multi_process and done < t.steps and ckpt.reached_preemption(done):
        stop.signum = signal.SIGTERM  # True on every process at the same step.
    interrupted = stop.signum is not None and done < t.steps
    saved = False
    if interrupted and done > start:
      # The step in flight finished; it is saved only if its update was applied.
      check_finite(done, jax.device_get(pending[1]))
      saved = ckpt.save(done, state, data_it.get_state())
    newest = ckpt.latest_step()
  finally:
    try:
      ckpt.close()  # Waits for the checkpoint writes, the interrupted step's included.
      writer.close()
    finally:
      stop.restore()
  if interrupted:
    name = signal.Signals(stop.signum).name
    if done > start:
      what = f"at step {done}: checkpoint {'saved' if saved else 'already saved'} in"
    elif newest is not None:
      what = f"before a step finished: nothing new to save (newest checkpoint: step {newest}) in"
    else:
      what = "before a step finished: no checkpoint yet in"
    raise TrainingInterrupted(stop.signum, done, f"interrupted by {name} {what} "
                              f"{ckpt.directory}; run the same command to resume")
  if done == start:
    # Nothing trained now (resumed at train.steps): the rows of the run that got there.
    last, last_val = _logged_metrics(writer.path)
  return {**last, **last_val}


def _throughput(tokens: int, step_flops: float, step_time: float, peak: float) -> dict:
  """``tokens_per_s`` and ``mfu`` of a step of ``step_time`` seconds.

  NaN (unknown; a null in metrics.jsonl) where no time was measured: a coarse clock
  reads 0 seconds for a fast step, which raised ZeroDivisionError and ended the run.
  """
  if not step_time > 0:
    return {"tokens_per_s": float("nan"), "mfu": float("nan")}
  return {"tokens_per_s": tokens / step_time,
          "mfu": step_flops / step_time / peak if peak > 0 else float("nan")}


def _logged_metrics(path: str) -> tuple[dict, dict]:
  """(last training row, last validation row) of a metrics file; empty without one."""
  try:
    rows = metrics_writer.read_rows(path)
  except (OSError, ValueError):
    return {}, {}
  last, last_val = {}, {}
  for row in rows:  # evaluate.py appends its "eval/" rows to the same file: skipped.
    if any(k.startswith("val_") for k in row):
      last_val = row
    elif "step_time_s" in row:
      last = row
  return last, last_val
