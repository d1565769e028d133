"""Memory plan: per-device bytes of params, gradients, optimizer state and activations.

Everything is derived from shapes on an abstract mesh (``jax.eval_shape`` and
``jax.sharding.AbstractMesh``): nothing is allocated and no accelerator is
needed, so a 7B plan for 8 GPUs runs on a laptop:

  python -m blockdiff_jax.main --config=configs/chatdlm_7b.py --workdir=/tmp/plan \
      --mode=plan --config.mesh.plan_devices=8

Parameter, gradient and optimizer bytes are exact per-device shard sizes under
the sharding rules. Activation bytes are an estimate of the peak of one
micro-batch (see ``activation_bytes``); XLA's real peak also depends on fusion,
buffer reuse and communication buffers, so leave headroom.
"""

import json
import math
import numbers
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.model import build
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import kv_memory
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import sharding
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle
from blockdiff_jax.train import config as train_config
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import step as step_lib

GIB = 2 ** 30


def shard_bytes(shape: Sequence[int], dtype, sharding_: jax.sharding.NamedSharding) -> int:
  """Bytes of one device's shard (ceil division, as padded uneven shards)."""
  sizes = dict(zip(sharding_.mesh.axis_names, sharding_.mesh.axis_sizes))
  n = 1
  for i, dim in enumerate(shape):
    entry = sharding_.spec[i] if i < len(sharding_.spec) else None
    n *= -(-dim // math.prod(sizes[a] for a in sharding.axes_of(entry)))
  return n * np.dtype(dtype).itemsize


def _tree_bytes(abstract: Any, shardings: Any) -> int:
  return int(sum(shard_bytes(a.shape, a.dtype, s)
                 for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))))


def _div(n: int, mesh: jax.sharding.AbstractMesh, axes) -> int:
  """n divided by the mesh axes (only when they divide it, as ``fit_spec`` does)."""
  spec = sharding.fit_spec(jax.sharding.PartitionSpec(axes), (n,), mesh)
  return n // math.prod(mesh.shape[a] for a in sharding.axes_of(spec[0]))


# One trunk pass of a train step: (rows per input row, tokens per row, keys each token's
# attention reads, positions the output head scores).
Pass = tuple[int, int, int, int]


def objective_passes(config: ml_collections.ConfigDict) -> list[Pass]:
  """The trunk passes one train step of ``config``'s objective runs, per input row.

  The shapes follow the objectives' loss functions (``diffusion/``), so the activation
  estimate grows with what the step really runs:

  * BD3-LM: one pass of ``[x_t ; x_0]`` (2L tokens, dense 2L-key attention on the XLA
    path), the head on the L noisy positions only; a summary-token model adds the
    clean stream's slots (``_with_summary``);
  * Fast-dLLM v2: the same 2L-token pass for each of the two complementary-mask copies
    (2x the rows), and the token shift reads the head on all 2L positions;
  * AR: one causal pass of L tokens;
  * I-DLM without anchors: one ``[noisy ; x_0]`` pass with the head on all 2L positions;
    with K anchors of stride N: a clean pass of L tokens, then K * N noisy tokens that
    read the clean K/V and their own block (L + K * N keys).
  """
  seq = config.data.seq_len
  obj = diffusion_config.objective(config, mask_id=0)  # The id changes no shape.
  if isinstance(obj, fastdllm.FastDLLMObjective):
    return [_with_summary(config, (2 if obj.complementary else 1, 2 * seq, 2 * seq, 2 * seq))]
  if isinstance(obj, autoregressive.AutoregressiveObjective):
    return [(1, seq, seq, seq)]
  if isinstance(obj, introspective.IntrospectiveObjective):
    if not obj.anchors:
      return [(1, 2 * seq, 2 * seq, 2 * seq)]
    noisy = obj.anchors * obj.stride
    return [(1, seq, seq, seq), (1, noisy, seq + noisy, noisy)]
  return [_with_summary(config, (1, 2 * seq, 2 * seq, seq))]


def _with_summary(config: ml_collections.ConfigDict, one: Pass) -> Pass:
  """A ``[x_t ; x_0]`` pass with the clean stream's summary slots, when the model has them.

  ``build.make_apply`` appends ``L // B * S`` slot positions to the 2L tokens; they run
  through every layer but carry no loss, so the head still scores the same positions.
  Every token reads all of them on the dense paths; ``attention_impl="structured"``
  scores a query against its own block, W clean blocks and the slot bank only.
  """
  su = config.model.get("summary")
  if su is None or not su.num_slots:
    return one
  rows, tokens, _, head = one
  block = config.diffusion.block_size
  bank = config.data.seq_len // block * su.num_slots
  keys = tokens + bank
  if config.model.attention_impl == "structured":
    keys = (su.window_blocks + 1) * block + bank
  return rows, tokens + bank, keys, head


def activation_bytes(cfg: transformer.TransformerConfig, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.AbstractMesh,
                     rules: mesh_lib.Rules) -> dict[str, int]:
  """Estimated activation bytes of one device for one micro-batch of a train step.

  Each trunk pass of the objective (``objective_passes``; BD3-LM runs T = 2 * seq_len
  tokens, [x_t ; x_0]) is counted with b sequences per device:

  * ``saved``: what the backward pass keeps. With remat, each layer's input
    [b, T, D]; without, also q/k/v, the attention probabilities (XLA path) and
    the MLP/expert (and shared-expert) hidden activations of every layer. Summed over
    the passes (the backward needs all of them).
  * ``layer``: the working set of the one layer being (re)computed: attention
    logits and probabilities in fp32 ([b, H, T, keys] x 2, XLA path; the Pallas
    kernel keeps per-tile state only) and the dispatched expert activations
    (with all-to-all expert parallelism, its send and receive buffers, sized
    for the worst case unless ``moe.capacity_factor`` bounds them). The largest pass.
  * ``logits``: fp32 [b, positions, V] logits, their log-softmax and its gradient,
    for every position the head scores.
  """
  t, d = config.train, config.data
  # First match wins, as in flax's logical_to_mesh_axes.
  spec = lambda name: next((axes for logical, axes in rules if logical == name), None)
  b = _div(d.batch_size // t.grad_accum_steps, mesh, spec("activation_batch"))
  act = np.dtype(cfg.compute_dtype).itemsize
  heads = _div(cfg.num_heads, mesh, spec("heads"))
  kv_heads = _div(cfg.num_kv_heads, mesh, spec("kv_heads"))
  vocab = _div(cfg.vocab_size, mesh, spec("vocab"))

  def one_pass(rows_per_seq: int, seq: int, keys: int) -> tuple[int, int]:
    """(saved, layer working set) bytes of one pass of ``rows_per_seq * b`` rows: the
    MoE layers with their expert activations, the dense ones (``first_dense_layers``,
    ``moe_every``) with the plain MLP's."""
    moe_layers = cfg.num_moe_layers
    kinds = [(moe, n) for moe, n in ((True, moe_layers), (False, cfg.num_layers - moe_layers))
             if n]
    sizes = [one_layer(rows_per_seq, seq, keys, moe) for moe, _ in kinds]
    saved = sum(n * s for (_, n), (s, _) in zip(kinds, sizes))
    return saved, max(w for _, w in sizes)

  def one_layer(rows_per_seq: int, seq: int, keys: int, moe: bool) -> tuple[int, int]:
    """(saved, working set) bytes of one layer of a pass."""
    rows_b = rows_per_seq * b
    if moe:
      # Token copies in and out of the experts, and their hidden activations.
      rows = rows_b * seq * cfg.moe.top_k
      buffers = 0
      ep = cfg.moe.num_experts // _div(cfg.moe.num_experts, mesh, spec("expert"))
      if ep > 1 and cfg.moe.expert_parallel == "all_to_all":
        # The experts run on a receive buffer of ep * C slots, and the send buffers
        # (copies out, results back) are as large (model/expert_parallel.py).
        cap = rows_b * seq * min(cfg.moe.top_k, cfg.moe.num_experts // ep)
        if cfg.moe.capacity_factor > 0:
          # make_plan's float expression, term for term: cf * (n * k) can round across
          # an integer where (cf * n) * k does not (1.1 * 360 / 2 -> 199, not 198).
          cap = min(cap, max(1, math.ceil(cfg.moe.capacity_factor * (rows_b * seq)
                                          * cfg.moe.top_k / ep)))
        rows = ep * cap
        buffers = 2 * rows * cfg.d_model
      mlp = rows * (3 * _div(cfg.moe.expert_dim, mesh, spec("expert_mlp")) + 2 * cfg.d_model)
      mlp += buffers
      # The shared expert is a plain SwiGLU over every token, beside the routed copies.
      mlp += rows_b * seq * 3 * _div(cfg.moe.shared_expert_dim, mesh, spec("mlp"))
    else:
      mlp = rows_b * seq * 3 * _div(cfg.mlp_dim, mesh, spec("mlp"))
    mlp *= act
    scores = 0 if cfg.attention_impl == "pallas" else 2 * rows_b * heads * seq * keys * 4
    qkv = rows_b * seq * (heads + 2 * kv_heads) * cfg.head_dim * act
    residual = rows_b * seq * cfg.d_model * act
    per_layer = residual * 4 + qkv + mlp + scores // 2  # Norm outputs, attention out, probs.
    saved = residual if cfg.remat else per_layer
    layer = scores + 2 * (qkv + mlp)  # Forward values and their gradients.
    return saved, layer

  passes = objective_passes(config)
  sizes = [one_pass(rows, seq, keys) for rows, seq, keys, _ in passes]
  logits = sum(3 * rows * b * head * vocab * 4 for rows, _, _, head in passes)
  return {"saved": sum(s for s, _ in sizes), "layer": max(w for _, w in sizes),
          "logits": logits}


def gradient_bytes(config: ml_collections.ConfigDict, params: Any, p_sharding: Any) -> int:
  """Per-device bytes of the gradients a train step holds.

  A frozen weight (``train.trainable`` = "lora" or "moe") enters the loss through
  ``stop_gradient``: its gradient is a zero XLA never materializes, so one step holds
  the trainable weights' gradients only. Gradient accumulation
  (``train.grad_accum_steps > 1``) adds the scan's accumulator, which ``train/step.py``
  holds for the trainable weights only, next to the gradients of the micro-batch being
  added into it.
  """
  mask = optimizer.mask_fn(config.train.get("trainable", "all"))
  leaves = jax.tree.leaves(params)
  shards = jax.tree.leaves(p_sharding)
  trains = [True] * len(leaves) if mask is None else jax.tree.leaves(mask(params))
  trainable = sum(shard_bytes(a.shape, a.dtype, s)
                  for a, s, m in zip(leaves, shards, trains) if m)
  if config.train.grad_accum_steps > 1:
    return int(2 * trainable)
  return int(trainable)


def plan(config: ml_collections.ConfigDict, num_devices: int | None = None,
         memory_gib: float | None = None) -> dict:
  """Per-device memory of a config on an abstract mesh.

  Args:
    config: experiment config; ``config.mesh`` gives the axis sizes and rules (without
      one, the one-device mesh training uses); ``model.vocab_size`` must be set unless
      the tokenizer is the byte one.
    num_devices: devices of the mesh; default ``config.mesh.plan_devices``, else the
      product of the fixed axis sizes, else ``jax.device_count()`` (1 for a config
      without a mesh section; more asks about ``mesh.default_mesh_config()`` there).
    memory_gib: memory per device; default ``config.mesh.plan_memory_gib``.

  Returns:
    {"mesh": axis sizes, "bytes": {part: bytes per device}, "warnings": why training
     would refuse the mesh (empty when it would not), "total_bytes", "memory_bytes",
     "fits", "params": parameter count}.
  """
  if not config.model.vocab_size:
    config = _with_byte_vocab(config)
  if config.model.moe.get("upcycle_from_dense", False):
    # As the trainer builds it (checkpoint/initial.py): experts as wide as the dense MLP,
    # not moe.expert_dim's default (the plan under-counted a 373M model as 68M).
    config = config.copy_and_resolve_references()
    upcycle.upcycle_model_config(config.model, config.model.moe.num_experts)
  train_config.validate(config)
  if config.get("sample") is not None and "kv_chunk" in config.sample:
    kv_memory.hierarchy_from_config(config.sample)  # Sizes the hierarchical cache.
  mesh_config = config.get("mesh")
  rules = None
  if mesh_config is None and num_devices in (None, 1):
    # Training a config without a mesh section runs on one device with every array
    # whole (``mesh.mesh_of``), however many devices the host has: plan that, not a
    # default mesh over ``jax.device_count()`` devices that training never builds.
    mesh_config, num_devices, rules = mesh_lib.single_device_mesh_config(), 1, ()
  elif mesh_config is None:
    # An explicit device count asks what the default mesh would hold on that many.
    mesh_config = mesh_lib.default_mesh_config()
  if num_devices is None:
    num_devices = mesh_config.get("plan_devices", 0) or None
  if num_devices is None:
    sizes = [mesh_config[a] for a in mesh_lib.MESH_AXES]
    num_devices = math.prod(sizes) if -1 not in sizes else jax.device_count()
  memory_gib = mesh_config.get("plan_memory_gib", 80.0) if memory_gib is None else memory_gib
  # A negative count or memory reads as a plan ("-1 devices", "fits in -1.0 GiB").
  if (isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral)
      or num_devices < 1):
    raise ValueError(f"mesh.plan_devices must be an integer >= 1 (0 = the mesh's own "
                     f"size), got {num_devices!r}")
  if not memory_gib > 0:  # Also refuses NaN.
    raise ValueError(f"mesh.plan_memory_gib must be > 0, got {memory_gib!r}")
  mesh = mesh_lib.abstract_mesh(mesh_config, num_devices)
  rules = mesh_lib.logical_rules(mesh_config) if rules is None else rules
  cfg = model_config.model_config(config)
  model = transformer.Transformer(cfg)
  boxed = build.abstract_params(model)
  params = nn.unbox(boxed)
  p_sharding = mesh_lib.param_shardings(boxed, mesh, rules)
  tx = optimizer.make_optimizer(config.train)
  opt = jax.eval_shape(tx.init, params)
  o_sharding = step_lib.opt_state_shardings(tx, opt, p_sharding, mesh)
  param_bytes = _tree_bytes(params, p_sharding)
  acts = activation_bytes(cfg, config, mesh, rules)
  parts = {
      "params (fp32)": param_bytes,
      "gradients (fp32)": gradient_bytes(config, params, p_sharding),
      "optimizer state": _tree_bytes(opt, o_sharding),
      "ema params": param_bytes if config.train.ema_decay > 0 else 0,
      "activations: saved for backward": acts["saved"],
      "activations: one layer working set": acts["layer"],
      "activations: logits + loss": acts["logits"],
  }
  total = sum(parts.values())
  return {"mesh": dict(mesh.shape), "num_devices": num_devices, "bytes": parts,
          "warnings": _mesh_warnings(config, mesh, rules),
          "decode_cache": decode_cache_bytes(cfg, config),
          "total_bytes": total, "memory_bytes": int(memory_gib * GIB),
          "fits": total <= memory_gib * GIB,
          "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}


def _with_byte_vocab(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with ``model.vocab_size`` of its byte tokenizer, which needs no files; any
  other tokenizer (BPE, a tokenizer.json, a pretrained model's) is not loaded here."""
  if (config.get("init") or {}).get("pretrained") or config.data.tokenizer != "byte":
    raise ValueError("model.vocab_size is 0: set it (the plan loads no tokenizer but the "
                     f"byte one; data.tokenizer={config.data.tokenizer!r})")
  config = config.copy_and_resolve_references()
  config.model.vocab_size = tokenizers.ByteTokenizer().vocab_size
  return config


def _mesh_warnings(config: ml_collections.ConfigDict, mesh: jax.sharding.AbstractMesh,
                   rules: mesh_lib.Rules) -> list[str]:
  """Why training would refuse this mesh, which the byte counts alone do not show.

  ``step.make_sharded_train`` refuses a micro-batch that the batch shards do not
  divide; the plan then counted every device holding the whole micro-batch and said
  it fit.
  """
  spec = mesh_lib.batch_spec(rules)
  n_batch = math.prod(mesh.shape[a] for a in sharding.axes_of(spec[0] if len(spec) else None))
  d, t = config.data, config.train
  micro = d.batch_size // t.grad_accum_steps
  if micro % n_batch:
    return [f"data.batch_size={d.batch_size} / train.grad_accum_steps={t.grad_accum_steps} "
            f"= {micro} sequences per micro-batch is not divisible by the {n_batch} batch "
            f"shards of mesh {dict(mesh.shape)}: training refuses this mesh"]
  return []


def decode_cache_bytes(cfg: transformer.TransformerConfig,
                       config: ml_collections.ConfigDict) -> dict:
  """KV cache of a decoding batch (``serve.slots`` rows of ``sample.max_len``), full and
  hierarchical (``sample.kv_window/kv_chunk/kv_rank``), in the model's dtype, unsharded.

  Sized as the decoders allocate it: the serving engine's canvas is ``max_len`` rounded
  up to whole diffusion blocks, and the block decoder stepping sub-blocks
  (``sample.sub_block_size`` < block size) keeps one block of uncommitted K/V per row
  beside the committed positions (``buffer``), in either cache.
  """
  s = config.get("sample")
  serve = config.get("serve")
  batch = serve.slots if serve is not None else 1
  length = (s.max_len if s is not None and s.max_len else 0) or config.data.seq_len
  block = config.diffusion.block_size if "diffusion" in config else 1
  capacity = -(-length // block) * block
  sub = s.get("sub_block_size", 0) if s is not None else 0
  block_decoder = s is None or s.get("policy", "threshold") not in ("ar", "isd")
  buffer = block if block_decoder and sub and block // sub > 1 else 0
  shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype, batch, capacity)
  # A summary-token model also keeps its committed blocks' slots (either cache).
  bank = 0 if cfg.summary is None else kv_memory.summary_bank_bytes(
      *shape, cfg.summary.block_size, cfg.summary.num_slots)
  out = {"rows": batch, "length": length, "capacity": capacity, "buffer": buffer,
         "full": kv_memory.full_cache_bytes(*shape, buffer_size=buffer) + bank}
  if s is not None and "kv_chunk" in s:
    form = s.get("kv_form", "rank")
    out["hierarchical"] = bank + kv_memory.hierarchical_cache_bytes(
        *shape, s.kv_window, s.kv_chunk, s.kv_rank, s.get("kv_sinks", 1),
        buffer_size=buffer, form=form)
    out["hierarchy"] = {"window": s.kv_window, "chunk": s.kv_chunk, "rank": s.kv_rank,
                        "sinks": s.get("kv_sinks", 1), "form": form}
  return out


def format_table(result: dict) -> str:
  """The plan as a fixed-width table (GiB per device)."""
  lines = [f"mesh {result['mesh']} ({result['num_devices']} devices), "
           f"{result['params']:,} parameters", f"{'per device':<38}{'GiB':>10}"]
  for name, n in result["bytes"].items():
    lines.append(f"  {name:<36}{n / GIB:>10.2f}")
  lines.append(f"  {'total':<36}{result['total_bytes'] / GIB:>10.2f}")
  verdict = "fits" if result["fits"] else "does NOT fit"
  lines.append(f"{verdict} in {result['memory_bytes'] / GIB:.1f} GiB per device")
  lines += [f"WARNING: {w}" for w in result.get("warnings", ())]
  dc = result.get("decode_cache")
  if dc:
    lines.append(f"decode KV cache, {dc['rows']} rows x {dc['length']} tokens (unsharded):")
    lines.append(f"  {'full':<36}{dc['full'] / GIB:>10.3f}")
    if "hierarchical" in dc:
      h = dc["hierarchy"]
      name = (f"hierarchical (W={h['window']}, chunk {h['chunk']}, r={h['rank']})"
              if h["form"] == "rank" else f"summary form (W={h['window']}, chunk {h['chunk']})")
      lines.append(f"  {name:<36}{dc['hierarchical'] / GIB:>10.3f}"
                   f"  ({dc['hierarchical'] / dc['full']:.1%} of full)")
      ring = (h["window"] + 1) * h["chunk"]
      if ring >= dc["capacity"]:
        # Nothing would ever leave a ring this wide: the decoders keep the full cache.
        lines.append(f"  (its exact ring of {ring} positions covers all {dc['capacity']}: "
                     "nothing would be compressed, so the decoders keep the full cache)")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``--mode=plan``: prints the table and writes ``plan.json`` to the workdir."""
  result = plan(config)
  print(format_table(result), flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "plan.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return result
