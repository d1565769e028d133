"""Checkpoint restores and experiment scripts: what they keep, count and record."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import build
from blockdiff_jax.model import flops
from blockdiff_jax.train import trainer
from conftest import load_experiment


def _state(value: float) -> dict:
  return {"params": {"w": jnp.full((4, 3), value, jnp.float32)},
          "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(state: dict) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_restoring_an_older_step_keeps_the_newer_checkpoints(tmp_path):
  """Asking for step 2 of a healthy [2, 4] run (e.g. to evaluate it) must not treat step
  4 as corrupt: it stays listed, in place, and restores afterwards."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  for step in (2, 4):
    ckpt.save(step, _state(float(step)), {"index": step})
  ckpt.wait()
  state, data = ckpt.restore(_abstract(_state(0.0)), step=2)
  assert int(state["step"]) == 2 and data == {"index": 2}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 2.0)
  assert list(ckpt.manager.all_steps()) == [2, 4]
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")
  state, data = ckpt.restore(_abstract(_state(0.0)))  # The latest is still step 4.
  assert int(state["step"]) == 4 and data == {"index": 4}
  ckpt.close()


def test_the_latest_restore_still_sets_a_corrupt_newer_step_aside(tmp_path):
  """The fallback (no step asked for) keeps moving steps that failed out of the way."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  for step in (2, 4):
    ckpt.save(step, _state(float(step)), {"index": step})
  ckpt.wait()
  with open(os.path.join(directory, "4", "data", "metadata"), "w", encoding="utf-8") as f:
    f.write("{not json")
  state, data = ckpt.restore(_abstract(_state(0.0)))
  assert int(state["step"]) == 2 and data == {"index": 2}
  assert list(ckpt.manager.all_steps()) == [2]
  assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 1
  ckpt.close()


_TRAIN_THROUGHPUT = []


def _train_throughput():
  # The script defines absl flags at import: a second fresh import would redefine them.
  if not _TRAIN_THROUGHPUT:
    _TRAIN_THROUGHPUT.append(load_experiment("train_throughput"))
  return _TRAIN_THROUGHPUT[0]


def _tiny_config():
  c = config_lib.base_config()
  c.data.seq_len, c.data.batch_size = 32, 2
  c.diffusion.block_size = 8
  c.model.d_model, c.model.moe.expert_dim = 32, 32
  c.model.moe.impl = "tiled"
  return c


def test_train_throughput_counts_a_frozen_base_as_the_trainer_does():
  """A LoRA run computes no weight gradients (2x forward, not 3x): the reported FLOPs and
  MFU must use the trainer's count, not overstate it 1.5x."""
  c = _tiny_config()
  c.model.lora.rank, c.model.lora.gated = 4, False
  c.train.trainable = "lora"
  r = _train_throughput().measure(c, 1)
  model, _ = build.build_model(c)
  want = flops.train_step_flops(model.cfg, 2, 32, frozen_base=True)
  assert r["model_tflops_per_step"] * 1e12 == pytest.approx(want, rel=1e-9)
  assert r["mfu"] == pytest.approx(want / r["median_step_s"] / (r["peak_gflops"] * 1e9))
  assert r["trainable"] == "lora"


@pytest.mark.parametrize("objective", ["fastdllm", "ar"])
def test_train_throughput_counts_flops_for_the_configs_objective(objective):
  """Complementary masks (Fast-dLLM v2) run each row twice and AR one causal stream; the
  BD3-LM [x_t ; x_0] count fits neither."""
  c = _tiny_config()
  c.diffusion.objective, c.diffusion.token_shift = objective, True
  model, tok = build.build_model(c)
  obj = diffusion_config.objective(c, tok.mask_id)
  got = trainer.objective_step_flops(c, model.cfg, obj)  # What train_throughput reports.
  want = (flops.fastdllm_step_flops(model.cfg, 2, 32, obj.complementary, False)
          if objective == "fastdllm" else
          flops.autoregressive_step_flops(model.cfg, 2, 32, False))
  assert got == pytest.approx(want)
  assert got != pytest.approx(flops.train_step_flops(model.cfg, 2, 32))


def _assert_no_path(path, directory):
  text = path.read_text()
  assert str(directory) not in text, f"{path.name} records the machine path {directory}"


def test_bench_kernels_records_no_machine_path(tmp_path, monkeypatch):
  """The default --out is this checkout's absolute path; the JSON must not carry it."""
  mod = load_experiment("bench_kernels")
  monkeypatch.setattr(mod, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(mod, "bench_gmm", lambda args, on_gpu: [])
  monkeypatch.setattr(mod, "bench_attention", lambda args, on_gpu: [])
  mod.main(["--quick"])
  _assert_no_path(tmp_path / "bench_kernels.json", tmp_path)
  assert json.loads((tmp_path / "bench_kernels.json").read_text())["meta"]["args"]["quick"]


def test_summary_attention_cost_records_no_machine_path(tmp_path, monkeypatch):
  mod = load_experiment("summary_attention_cost")
  monkeypatch.setattr(mod, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(mod, "measure", lambda n, kind, args: {
      "n": n, "kind": kind, "block_size": 32, "logits_per_head": float(n) * n,
      "hlo_flops": float(n) ** (2 if kind == "full" else 1.5), "forward_ms": 1e-3 * n})
  mod.main(["--quick"])
  _assert_no_path(tmp_path / "summary_attention_cost.json", tmp_path)
  _assert_no_path(tmp_path / "summary_attention_cost.md", tmp_path)


def test_bench_decode_attention_records_no_machine_path(tmp_path, monkeypatch):
  mod = load_experiment("bench_decode_attention")
  monkeypatch.setattr(mod, "bench", lambda args, on_gpu: [])
  monkeypatch.setattr(mod, "_write", lambda rows, meta, out: (tmp_path / "meta.json").write_text(
      json.dumps(meta)))
  mod.main(["--quick", "--out", str(tmp_path / "bench")])
  _assert_no_path(tmp_path / "meta.json", tmp_path)
