"""--mode=plan with summary tokens, and the MFU peak of a whole mesh.

The plan is checked against XLA's memory analysis of the real compiled train step and
against the token count of the model's own summary layout (``masks.SummaryLayout``);
the peak against one device's figure times the devices that share the step.
"""

import types

import pytest

from blockdiff_jax import masks
from blockdiff_jax.model import config as model_config
from blockdiff_jax.train import hardware
from blockdiff_jax.train import plan
from test_hardening_plan import _compiled_temp_bytes
from test_hardening_plan import _config
from test_hardening_plan import _lora
from test_hardening_plan import GRADS


def _summary_config(slots=8, impl="xla"):
  c = _config(vocab=1024, moe=False)
  c.data.seq_len, c.data.batch_size = 64, 2
  c.model.summary.num_slots, c.model.attention_impl = slots, impl
  return c


def test_plan_counts_the_summary_slots_every_layer_runs():
  """A summary model's step runs 2L + L/B*S positions through every layer: the plan
  counted 2L (at 8 slots per 4-token block it was under half of XLA's scratch)."""
  c = _summary_config()
  L, B, S = c.data.seq_len, c.diffusion.block_size, c.model.summary.num_slots
  layout = masks.SummaryLayout(streams=2, block_size=B, num_slots=S)
  tokens = layout.num_tokens(L) + L // B * S  # Streams, then the clean stream's slots.
  assert layout.stream_length(tokens) == L
  assert plan.objective_passes(c) == [(1, tokens, tokens, L)]  # Head: the L noisy only.
  acts = sum(v for k, v in plan.plan(c)["bytes"].items() if k.startswith("activations"))
  temp = _compiled_temp_bytes(c)
  assert 0.6 < acts / temp < 1.25, (acts, temp)
  # Structured attention scores a query against its own block, W clean blocks and the
  # bank (summary_attention.py), not all positions.
  s = _summary_config(impl="structured")
  W = s.model.summary.window_blocks
  assert plan.objective_passes(s) == [(1, tokens, (W + 1) * B + L // B * S, L)]
  cfg = model_config.model_config(s)
  assert cfg.summary is not None and cfg.attention_impl == "structured"
  # Fast-dLLM's two complementary copies each carry the slots; its head reads all 2L.
  f = _summary_config()
  f.diffusion.objective, f.diffusion.token_shift = "fastdllm", True
  assert plan.objective_passes(f) == [(2, tokens, tokens, 2 * L)]


def _gpu(kind, process=0):
  return types.SimpleNamespace(platform="gpu", device_kind=kind, process_index=process)


def test_peak_flops_is_the_peak_of_every_device_of_the_step(monkeypatch):
  """MFU divides the whole batch's FLOPs by the peak: one GPU's peak for a mesh of 8
  read 8x the real utilization."""
  monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
  one = _gpu("NVIDIA H100 80GB HBM3")
  monkeypatch.setattr(hardware.jax, "devices", lambda *a: [one])
  single, _ = hardware.peak_flops("bfloat16")
  assert single == 989e12
  mesh = [_gpu("NVIDIA H100 80GB HBM3", process=i // 4) for i in range(8)]
  peak, how = hardware.peak_flops("bfloat16", mesh)
  assert peak == 8 * single and how.startswith("8 x datasheet")
  # Simulated CPU devices of one process share its cores: the host counts once, and
  # once per process of a multi-process CPU run.
  monkeypatch.setattr(hardware, "measure_matmul_peak", lambda *a, **k: 5e10)
  cpus = lambda processes: [types.SimpleNamespace(platform="cpu", device_kind="cpu",
                                                  process_index=i % processes)
                            for i in range(8)]
  assert hardware.peak_flops("float32", cpus(1))[0] == 5e10
  assert hardware.peak_flops("float32", cpus(2))[0] == 1e11
  # An unknown GPU falls back to a timed matmul, named as such.
  assert hardware.peak_flops("float32", [_gpu("NVIDIA B300")])[1].startswith("measured")
  with pytest.raises(ValueError, match="at least one device"):
    hardware.peak_flops("float32", [])


def test_lora_accumulation_keeps_no_copy_of_the_frozen_base():
  """With a frozen base, accumulation summed into zeros_like(params): XLA's scratch of
  a LoRA step with 2 micro-batches was 1.6x the base params (the base's copy), and the
  plan counted it. (test_idlm_training checks the accumulated update itself.)"""
  c = _lora(_config(d_model=256, moe=False, vocab=32))
  c.model.mlp_dim, c.train.grad_accum_steps = 2048, 2
  r = plan.plan(c)["bytes"]
  temp = _compiled_temp_bytes(c)
  assert temp < r["params (fp32)"], (temp, r)
  assert r[GRADS] < temp
