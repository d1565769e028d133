"""--mode=plan against what the code really allocates, the MFU peak, and main's flags.

Every figure is checked against an independent count: the arrays of the real train state
and decode caches (``jax.eval_shape``), or XLA's memory analysis of the compiled train step.
"""

import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import build
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import kv_memory
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import transformer
from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import sample as sample_lib
from blockdiff_jax.train import hardware
from blockdiff_jax.train import plan
from blockdiff_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRADS = "gradients (fp32)"


def _config(vocab=64, d_model=32, moe=True, **sections):
  """A tiny config; ``sections`` as ``{"train__trainable": "lora"}``-style overrides."""
  c = config_lib.base_config()
  c.model.vocab_size = vocab
  c.model.d_model, c.model.num_layers = d_model, 1
  c.model.num_heads = c.model.num_kv_heads = 2
  c.model.head_dim = d_model // 2
  c.model.mlp_dim = 2 * d_model
  if not moe:
    c.model.moe.num_experts = 0
  c.data.seq_len, c.data.batch_size = 16, 2
  c.diffusion.block_size = 4
  for key, value in sections.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def _lora(c, rank=4):
  c.model.lora.rank, c.model.lora.gated = rank, False
  c.train.trainable = "lora"
  return c


def _unsharded_bytes(tree, keep=lambda path: True) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for p, a in leaves if keep(p)))


def _params(c):
  model = transformer.Transformer(model_config.model_config(c))
  return nn.unbox(build.abstract_params(model))


def _compiled_temp_bytes(c) -> int:
  """XLA's scratch bytes of the real train step of ``c`` on one device."""
  mesh, rules = mesh_lib.mesh_of(c)
  model = transformer.Transformer(model_config.model_config(c))
  obj = diffusion_config.objective(c, c.model.vocab_size - 1)
  sharded = step_lib.make_sharded_train(c, mesh, model, obj, rules=rules)
  shape = (c.data.batch_size, c.data.seq_len)
  batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
           "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  lowered = sharded.train_step.__wrapped__.lower(sharded.abstract_state, batch, key)
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_plan_of_a_config_without_mesh_is_the_one_device_run(monkeypatch):
  """Training a config with no mesh section uses one device whatever the host has
  (``mesh.mesh_of``); the plan used to spread it ZeRO-3 over every device instead."""
  c = _config()
  assert c.get("mesh") is None
  monkeypatch.setattr(jax, "device_count", lambda: 8)  # A host with 8 accelerators.
  r = plan.plan(c)
  assert r["num_devices"] == 1
  assert r["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  whole = _unsharded_bytes(_params(c))
  assert r["bytes"]["params (fp32)"] == whole
  assert r["bytes"]["optimizer state"] >= 2 * whole  # Adam's two moments, unsplit.
  # An explicit device count still asks what the default mesh would hold there.
  assert plan.plan(c, num_devices=8)["mesh"]["fsdp"] == 8


def test_lora_gradients_are_the_adapters_only():
  """A frozen base enters the loss through stop_gradient: no gradient is formed for it."""
  c = _lora(_config())
  params = _params(c)
  adapters = _unsharded_bytes(
      params, lambda p: any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in p))
  assert 0 < adapters < _unsharded_bytes(params) // 4
  assert plan.plan(c)["bytes"][GRADS] == adapters
  # train.trainable="moe": the MoE layers' routers and experts only.
  m = _config(train__trainable="moe")
  moe = _unsharded_bytes(_params(m), lambda p: any(getattr(k, "key", None) == "moe"
                                                   for k in p))
  assert plan.plan(m)["bytes"][GRADS] == moe
  # Accumulation adds train/step.py's accumulator, shaped like the trainable params only.
  c.train.grad_accum_steps = 2
  assert plan.plan(c)["bytes"][GRADS] == 2 * adapters


def test_lora_step_compiles_without_the_base_gradients():
  """XLA's scratch of a LoRA step is below the base's size: the old plan's full-size
  gradients were never allocated; the plan's figure fits in what XLA holds."""
  c = _lora(_config(d_model=256, moe=False, vocab=32))
  c.model.num_layers, c.model.mlp_dim, c.data.batch_size = 2, 1024, 1
  r = plan.plan(c)["bytes"]
  temp = _compiled_temp_bytes(c)
  assert temp < r["params (fp32)"]
  assert r[GRADS] < temp


def test_activations_follow_the_objective():
  """Fast-dLLM runs 2x the rows and reads the head on all 2L positions; AR runs L tokens.

  Against XLA's scratch bytes of each real step (with no optimizer-size terms to hide
  behind: a tiny dense model with a large vocabulary), the estimate stays within a
  factor of the truth for every objective, and ranks them as XLA does.
  """
  def both(objective):
    c = _config(vocab=1024, moe=False, diffusion__objective=objective,
                diffusion__token_shift=objective != "bd3")
    c.data.seq_len, c.data.batch_size = 64, 2
    acts = sum(v for k, v in plan.plan(c)["bytes"].items() if k.startswith("activations"))
    return acts, _compiled_temp_bytes(c), c

  bd3, fast, ar = both("bd3"), both("fastdllm"), both("ar")
  for acts, temp, _ in (bd3, fast, ar):
    assert 0.6 < acts / temp < 1.25, (acts, temp)
  assert fast[0] > 2 * bd3[0] > 2 * ar[0]
  # The logits term by hand: fp32 logits, log-softmax and gradient of each scored position.
  c = fast[2]
  mesh = mesh_lib.abstract_mesh(mesh_lib.single_device_mesh_config(), 1)
  logits = lambda cc: plan.activation_bytes(model_config.model_config(cc), cc, mesh,
                                            ())["logits"]
  rows, positions = 2 * c.data.batch_size, 2 * c.data.seq_len  # Complementary copies.
  assert logits(c) == 3 * rows * positions * c.model.vocab_size * 4
  assert logits(ar[2]) == 3 * c.data.batch_size * c.data.seq_len * c.model.vocab_size * 4


def _real_decode_cache(c, hierarchical: bool) -> int:
  """Bytes of the cache the serving block decoder allocates (sampling/state.py)."""
  bk = c.diffusion.block_size
  opt = sample_lib.options_from_config(c.sample, bk, tokenizers.ByteTokenizer())
  width = -(-c.sample.max_len // bk) * bk  # serving/engine.py: whole blocks.
  buffer = bk if opt.num_sub > 1 else 0  # sampling/state.py: sub-block steps.
  mc = model_config.model_config(c)
  spec = kv_cache.KVSpec(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads,
                         head_dim=mc.head_dim, dtype=mc.compute_dtype)
  hy = kv_memory.hierarchy_from_config(c.sample) if hierarchical else None
  return hierarchical_cache.cache_bytes(spec, c.serve.slots, width, hy, buffer_size=buffer)


@pytest.mark.parametrize("sub_block,max_len", [(2, 62), (0, 62), (2, 64)])
def test_decode_cache_is_what_the_decoder_allocates(sub_block, max_len):
  """Sub-block decoding keeps one block of K/V beside the committed positions, and the
  canvas is whole blocks: both used to be left out."""
  c = _config()
  c.sample.sub_block_size, c.sample.max_len = sub_block, max_len
  c.sample.kv_chunk, c.sample.kv_window, c.sample.kv_rank = 8, 1, 2
  dc = plan.plan(c)["decode_cache"]
  assert dc["full"] == _real_decode_cache(c, hierarchical=False)
  assert dc["hierarchical"] == _real_decode_cache(c, hierarchical=True)


def test_short_context_hierarchical_cache_is_the_full_cache():
  """Below its ring's width a hierarchical cache would compress nothing: the decoders keep
  the full cache (no ring, factor bank or sinks on top), and the plan counts and says so."""
  c = _config()
  c.sample.max_len = 64  # Ring of (2 + 1) * 256 = 768 positions.
  r = plan.plan(c)
  dc = r["decode_cache"]
  assert dc["hierarchical"] == _real_decode_cache(c, hierarchical=True)
  assert dc["hierarchical"] == dc["full"] == _real_decode_cache(c, hierarchical=False)
  assert "the decoders keep the full cache" in plan.format_table(r)
  c.sample.max_len = 4096
  r = plan.plan(c)
  assert r["decode_cache"]["hierarchical"] < r["decode_cache"]["full"]
  assert "keep the full cache" not in plan.format_table(r)


def _fake_gpu(monkeypatch, kind):
  dev = types.SimpleNamespace(platform="gpu", device_kind=kind)
  monkeypatch.setattr(jax, "devices", lambda *a: [dev])
  monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)


def test_float32_peak_is_the_tf32_rate_jax_runs_at(monkeypatch):
  """JAX's default precision runs float32 dots as TF32 on tensor cores: dividing by the
  CUDA-core float32 peak (67 TFLOP/s on an H100) would report MFU up to 7x too high."""
  _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
  assert hardware.peak_flops("float32")[0] == 495e12
  assert hardware.peak_flops("bfloat16")[0] == 989e12
  with jax.default_matmul_precision("highest"):
    assert hardware.peak_flops("float32")[0] == 67e12
  monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
  assert hardware.peak_flops("float32")[0] == 67e12


def test_pcie_parts_get_their_own_peak(monkeypatch):
  """ "NVIDIA H100 PCIe" contains "H100": it used to get the SXM part's 989 TFLOP/s."""
  _fake_gpu(monkeypatch, "NVIDIA H100 PCIe")
  assert hardware.peak_flops("bfloat16")[0] == 756e12
  _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB")
  assert hardware.peak_flops("bfloat16")[0] == 312e12


def test_server_flags_outside_serve_mode_are_refused(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.main", f"--config={REPO}/configs/tiny.py",
       f"--workdir={tmp_path}", "--mode=plan", "--config.model.vocab_size=64", "--port=8080"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode != 0
  assert "--port applies to --mode=serve only, not --mode=plan" in out.stdout + out.stderr
  assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("remat", [False, True])
def test_activations_count_the_dense_layers_of_an_moe_model_as_dense(remat):
  """``first_dense_layers`` / ``moe_every`` layers run the plain MLP; the plan sized every
  layer as an MoE layer."""
  mesh = mesh_lib.abstract_mesh(mesh_lib.single_device_mesh_config(), 1)

  def acts(moe=True, first_dense=0):
    c = _config(moe=moe)
    c.model.num_layers, c.model.remat = 2, remat
    c.model.moe.first_dense_layers = first_dense
    return plan.activation_bytes(model_config.model_config(c), c, mesh, ())

  dense, all_moe = acts(moe=False), acts()
  assert all_moe != dense  # The two kinds differ, so the checks below can fail.
  assert acts(first_dense=2) == dense  # An MoE config whose every layer is dense.
  half = acts(first_dense=1)
  assert 2 * half["saved"] == dense["saved"] + all_moe["saved"]
  assert half["layer"] == max(dense["layer"], all_moe["layer"])
  assert half["logits"] == dense["logits"]
