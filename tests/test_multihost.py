"""Two processes on localhost (4 CPU devices each) train on one global mesh and checkpoint.

Each process runs this file as a worker: ``distributed.initialize`` from the
environment, a data=2 x fsdp=2 x expert=2 mesh over the 8 global devices, three
AdamW steps, an Orbax save and a restore. Both must report the same losses. Then both
run the trainer on one shared workdir, as "the same command on each host" does.
"""

import json
import os
import socket
import subprocess
import sys
import time

if __name__ == "__main__":
  # Must precede the first jax import of the worker process.
  # Keeps the flags the suite gives (conftest), adding the simulated devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, MASK_ID = 128, 127


def _worker(out_path: str, workdir: str) -> None:
  """One process of the job: train 3 steps, save, restore, write a JSON report."""
  from blockdiff_jax.train import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from blockdiff_jax import config as config_lib
  from blockdiff_jax.model import transformer
  from blockdiff_jax.checkpoint import checkpoints
  from blockdiff_jax.model import mesh as mesh_lib
  from blockdiff_jax.train import step as step_lib
  sys.path.insert(0, REPO)
  from configs import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  # One block: the checks are about processes, collectives and checkpoints, which a
  # second block only repeats at twice the compile time (most of the run).
  config.model.num_layers = 1
  config.model.vocab_size = VOCAB
  config.train.warmup_steps = 0
  config.mesh = mesh_lib.default_mesh_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 2, 2, 2
  model = transformer.Transformer(config_lib.model_config(config))
  obj = config_lib.objective(config, MASK_ID)
  mesh = mesh_lib.make_mesh(config.mesh)
  sharded = step_lib.make_sharded_train(config, mesh, model, obj)
  state = sharded.init_state(config.seed)
  base_rng = jax.random.key(1)
  losses = []
  for step in range(3):
    # Every process builds the same global batch; put_batch copies its own shards.
    rng = np.random.default_rng(step)
    batch = {"tokens": rng.integers(0, MASK_ID, (8, 64)).astype(np.int32),
             "loss_mask": np.ones((8, 64), np.float32)}
    state, metrics = sharded.train_step(state, sharded.put_batch(batch), base_rng)
    losses.append(float(metrics["loss"]))

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
  ckpt.save(3, state, {"index": 3})
  ckpt.wait()
  restored, data = ckpt.restore(sharded.abstract_state)
  ckpt.close()
  diff = jax.jit(lambda a, b: jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b))])), out_shardings=mesh_lib.replicated(mesh))(
          restored, state)
  # The trainer, as `--mode=train` runs it on each host, in one shared workdir.
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  run = tiny.get_config()
  run.model.num_layers = 1
  run.mesh = config.mesh
  run.data.max_bytes = 20_000
  run.train.steps, run.train.log_every, run.train.eval_every = 2, 1, 0
  run.train.checkpoint_every, run.train.async_checkpoints = 2, False
  run.train.tensorboard = False
  last = trainer.run(run, os.path.join(workdir, "run"))
  report = {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "losses": losses, "restored_step": int(restored.step), "data": data,
            "restore_diff": float(diff), "trainer_loss": float(last["loss"])}
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(report, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_together(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, __file__, str(tmp_path / f"p{pid}.json"), str(tmp_path)],
        env=env, cwd=REPO, stdout=open(tmp_path / f"p{pid}.log", "w", encoding="utf-8"),
        stderr=subprocess.STDOUT, text=True))
  # No wall-clock limit (a busy machine only makes the run slower): the pair is
  # watched instead, and when one process fails the other, which would wait for
  # its peer in a collective, is stopped.
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.5)
    outputs = [(tmp_path / f"p{pid}.log").read_text(encoding="utf-8") for pid in range(2)]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]
  r0, r1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  assert (r0["process"], r1["process"]) == (0, 1)
  assert r0["processes"] == 2 and r0["devices"] == 8 and r0["local_devices"] == 4
  assert r0["losses"] == r1["losses"]
  assert all(np.isfinite(r0["losses"]))
  for r in (r0, r1):
    assert r["restored_step"] == 3 and r["data"] == {"index": 3}
    assert r["restore_diff"] == 0.0
  # One lock holder and one writer: the second process neither failed on the workdir
  # lock nor wrote its own copy of every metrics row.
  assert r0["trainer_loss"] == r1["trainer_loss"] and np.isfinite(r0["trainer_loss"])
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8")]
  assert [r["step"] for r in rows] == [1, 2]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 2
  # The console reads once: progress and the trainer's notes come from process 0 only.
  for line in ("[2/2 ", "model: ", "first step (compile included)"):
    assert line in outputs[0] and line not in outputs[1], (line, outputs[1][-2000:])


@pytest.mark.parametrize("env,error", [
    ({"JAX_NUM_PROCESSES": "2"}, "coordinator"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2",
      "JAX_COORDINATOR_ADDRESS": "localhost:1"}, "process_id=2"),
    ({"JAX_NUM_PROCESSES": "x"}, "JAX_NUM_PROCESSES='x'"),
])
def test_settings_errors_name_the_bad_value(monkeypatch, env, error):
  from blockdiff_jax.train import distributed  # pylint: disable=g-import-not-at-top
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=error):
    distributed.settings()


def test_single_process_is_a_noop(monkeypatch):
  from blockdiff_jax.train import distributed  # pylint: disable=g-import-not-at-top
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.settings() == (None, 1, 0)
  assert not distributed.initialize()


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
