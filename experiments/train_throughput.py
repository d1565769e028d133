r"""Tokens/s and MFU of a config's train step, against the device peak measured in the same run.

The peak is the best of several timed large matmuls in the compute dtype (on a GPU the
datasheet dense peak when the device is known). Model FLOPs are the trainer's count for
the config's objective (``trainer.objective_step_flops``): for BD3-LM the vectorized [x_t ; x_0] pass as the
XLA path computes it (2L tokens through the trunk, dense 2L-key attention, the head on L
tokens), times 3 for forward + backward (2 with ``train.trainable=lora``).

  python experiments/train_throughput.py --config=configs/quickstart.py --steps=10
  python experiments/train_throughput.py --config=configs/quickstart.py \
      --config.model.moe.impl=dense   # compare dispatch implementations
  python experiments/train_throughput.py --config=configs/quickstart.py --mesh=explicit
      # the sharded step on a mesh of all devices (fsdp=-1), Explicit axes
"""

import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import build
from blockdiff_jax.model import flops
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.train import config as train_config
from blockdiff_jax.train import hardware
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile step).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where JSON and Markdown go.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the result files.")
_MESH = flags.DEFINE_enum("mesh", "", ["", "auto", "explicit"],
                          "Time the sharded step on the config's mesh (the default mesh "
                          "when it has none) with these axis types; empty = as the config "
                          "says (sharded only if it has a mesh).")


def measure(config, steps: int) -> dict:
  """Times ``steps`` train steps of ``config`` on random tokens; returns the figures.

  Raises:
    ValueError: ``steps`` < 1 (``--steps``), before the model is built and compiled.
  """
  if steps < 1:  # No timed step: the median below indexed an empty list after the compile.
    raise ValueError(f"--steps={steps} must be >= 1")
  train_config.validate(config)
  d = config.data
  model, tokenizer = build.build_model(config)
  obj = diffusion_config.objective(config, tokenizer.mask_id)
  tx = optimizer.make_optimizer(config.train)
  batch = {"tokens": jax.random.randint(jax.random.key(0), (d.batch_size, d.seq_len), 0, 256),
           "loss_mask": jnp.ones((d.batch_size, d.seq_len)),
           "segment_ids": jnp.zeros((d.batch_size, d.seq_len), jnp.int32)}
  # The trainer's step: state in its shards, MoE dispatch in shard_map on a mesh
  # (one device when the config has none).
  device_mesh, rules = mesh_lib.mesh_of(config)
  sharded = step_lib.make_sharded_train(config, device_mesh, model, obj, tx, rules=rules)
  mesh = dict(sharded.mesh.shape) if config.get("mesh") is not None else None
  state, step = sharded.init_state(config.seed), sharded.train_step
  batch = sharded.put_batch(jax.device_get(batch))
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = step(state, batch, rng)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = sorted(times)[len(times) // 2]
  peak, peak_how = hardware.peak_flops(config.model.dtype, list(sharded.mesh.devices.flat))
  mcfg = model.cfg
  flops_per_step = trainer.objective_step_flops(config, mcfg, obj)
  return {
      "device": jax.devices()[0].device_kind, "platform": platform.platform(),
      "cpu_count": os.cpu_count(), "params": flops.param_counts(mcfg),
      "batch_size": d.batch_size, "seq_len": d.seq_len, "moe_impl": config.model.moe.impl,
      "attention_impl": config.model.attention_impl, "dtype": config.model.dtype,
      "mesh": mesh, "axis_types": config.mesh.axis_types if mesh else None,
      "compile_s": compile_s, "median_step_s": step_s,
      "tokens_per_s": d.batch_size * d.seq_len / step_s,
      "objective": config.diffusion.get("objective", "bd3"),
      "trainable": config.train.get("trainable", "all"),
      "model_tflops_per_step": flops_per_step / 1e12,
      "achieved_gflops": flops_per_step / step_s / 1e9,
      "peak_gflops": peak / 1e9, "peak_source": peak_how,
      "mfu": flops_per_step / step_s / peak,
  }


def main(argv):
  del argv
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps={_STEPS.value} must be >= 1")
  config = _CONFIG.value
  if _MESH.value:
    if config.get("mesh") is None:
      config.mesh = mesh_lib.default_mesh_config()
    config.mesh.axis_types = _MESH.value
  r = measure(config, _STEPS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  name = "train_throughput" + (f"_{_TAG.value}" if _TAG.value else "")
  with open(os.path.join(_OUT.value, name + ".json"), "w", encoding="utf-8") as f:
    json.dump(r, f, indent=2)
  rows = [("device", r["device"]), ("moe impl / attention", f"{r['moe_impl']} / "
                                    f"{r['attention_impl']}"),
          ("objective / trainable", f"{r['objective']} / {r['trainable']}"),
          ("batch x seq_len", f"{r['batch_size']} x {r['seq_len']}"),
          ("mesh", f"{r['mesh']} ({r['axis_types']} axes)" if r["mesh"] else "none"),
          ("median step", f"{r['median_step_s'] * 1e3:.1f} ms"),
          ("tokens/s", f"{r['tokens_per_s']:.0f}"),
          ("achieved", f"{r['achieved_gflops']:.1f} GFLOP/s"),
          ("peak (same run)", f"{r['peak_gflops']:.1f} GFLOP/s ({r['peak_source']})"),
          ("MFU", f"{100 * r['mfu']:.1f}%")]
  table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
  with open(os.path.join(_OUT.value, name + ".md"), "w", encoding="utf-8") as f:
    f.write(f"# Train-step throughput\n\n{table}\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
