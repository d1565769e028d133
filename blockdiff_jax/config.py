"""The base experiment config that every file in ``configs/`` starts from, and its validation.

Every field carries a comment. Config files override what they need; the command line
overrides the rest, e.g. ``--config.model.moe.num_experts=8``. ``validate`` runs before
anything compiles and names the offending field and value.
"""

import ml_collections

from blockdiff_jax.data import config as data_config
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.evaluation import eval_config
from blockdiff_jax.model import moe
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from blockdiff_jax.sampling import sample as sample_lib


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments (a tiny MoE block-diffusion model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seed of parameter init, noise draws and data order.

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0 = take it from the tokenizer.
  m.d_model = 64  # Residual width.
  m.num_layers = 2  # Transformer blocks.
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # Key/value heads (grouped-query attention).
  m.head_dim = 16  # Per-head width.
  m.mlp_dim = 128  # Hidden width of dense SwiGLU layers.
  m.qkv_bias = False  # Bias on q/k/v projections (Qwen2 uses it).
  m.qk_norm = False  # RMSNorm on q and k per head (Qwen3 uses it).
  m.tie_embeddings = True  # Share the input embedding with the output head.
  m.rope_theta = 10000.0  # RoPE base.
  m.rope_scaling = ml_collections.ConfigDict()
  m.rope_scaling.type = "none"  # none | linear | ntk | yarn (like HF rope_scaling).
  m.rope_scaling.factor = 1.0  # Context extension factor.
  m.rope_scaling.original_max_position = 4096  # Pre-training context (YaRN).
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.dtype = "float32"  # Compute dtype (params stay fp32): float32 | bfloat16.
  m.attention_impl = "xla"  # xla (materialized mask) | pallas (tiled kernel).
  m.interpret = True  # Run Pallas kernels in interpret mode (required on CPU).
  m.scan_layers = False  # nn.scan over runs of identical layers (faster compiles).
  m.remat = False  # Rematerialize each block in the backward pass (saves memory).
  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 4  # Experts per MoE layer; 0 = dense model.
  e.top_k = 2  # Experts per token.
  e.expert_dim = 64  # Hidden width of each expert's SwiGLU.
  e.shared_expert_dim = 0  # Hidden width of an always-on shared expert; 0 = none.
  e.moe_every = 1  # Every k-th layer (after first_dense_layers) is MoE.
  e.first_dense_layers = 0  # Leading layers kept dense.
  e.router_func = "softmax"  # softmax | sigmoid, computed in fp32.
  e.router_mode = "token"  # token (top-k per token) | block (dMoE coreset per block).
  e.normalize_topk = True  # Renormalize the k combine weights to sum to 1.
  e.block_coverage = 0.9  # Block routing: cumulative router share p the coreset covers.
  e.block_min_experts = 2  # Block routing: minimum coreset size (>= top_k).
  e.impl = "ragged_dot"  # Dispatch: ragged_dot | tiled (CPU) | pallas (GMM kernel) | dense.
  e.tile_size = 128  # Rows per tile of the tiled dispatch (groups are padded to it).
  # On a mesh: all_to_all (shard_map; with mesh.expert > 1 tokens travel to the
  # expert shards) | gather (GSPMD partitions the local dispatch).
  e.expert_parallel = "all_to_all"
  # all_to_all: receive slots per sender as a multiple of its average load
  # (GShard capacity; copies past it are dropped); 0 = the worst case, dropless.
  e.capacity_factor = 0.0
  e.load_balance_weight = 0.01  # Weight of E * sum_e fraction_e * mean_prob_e.
  e.z_loss_weight = 1e-3  # Weight of mean logsumexp(router logits)^2.

  c.diffusion = d = ml_collections.ConfigDict()
  d.block_size = 8  # Tokens per block (1 = AR, seq_len = MDLM).
  d.schedule = "loglinear"  # Noise schedule.
  d.eps = 1e-3  # Smallest t (bounds the 1/t weight).
  d.beta = 1e-3  # Lower clip of the training noise level t.
  d.omega = 1.0  # Upper clip of the training noise level t.
  d.antithetic = True  # Stratify t across the batch.

  c.data = data_config.default_data_config()
  c.data.seq_len = 64  # Tokens per training sequence (multiple of block_size).
  c.data.batch_size = 8  # Sequences per step (global, across all devices).

  c.sample = sample_lib.default_sample_config()  # Decoding policy, limits, prompts.
  c.eval = eval_config.default_eval_config()  # Tasks and settings of --mode=eval.

  c.train = t = ml_collections.ConfigDict()
  t.steps = 100  # Optimizer steps.
  t.learning_rate = 3e-3  # Peak learning rate.
  t.warmup_steps = 10  # Linear warmup steps.
  t.min_lr_ratio = 0.1  # Final LR of the cosine decay as a fraction of the peak.
  t.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms and biases).
  t.b1 = 0.9  # Adam beta1.
  t.b2 = 0.95  # Adam beta2.
  t.grad_clip = 1.0  # Global-norm gradient clipping; 0 = off.
  t.ema_decay = 0.0  # EMA of parameters; 0 = off.
  t.grad_accum_steps = 1  # Micro-batches per step (batch_size must divide).
  t.log_every = 10  # Steps between metric lines.
  t.eval_every = 50  # Steps between validation NELBO evaluations; 0 = off.
  t.eval_batches = 2  # Validation batches per evaluation.
  t.checkpoint_every = 50  # Steps between checkpoints (and one at the end).
  t.keep_checkpoints = 2  # Checkpoints kept on disk.
  t.async_checkpoints = True  # Write checkpoints in the background.
  t.tensorboard = True  # Also write TensorBoard event files.
  return c


def model_config(config: ml_collections.ConfigDict,
                 vocab_size: int | None = None) -> transformer.TransformerConfig:
  """The static TransformerConfig of an experiment config."""
  return transformer.TransformerConfig.from_config(config.model, vocab_size)


def objective(config: ml_collections.ConfigDict, mask_id: int) -> losses.BlockDiffusionObjective:
  """The training objective of an experiment config."""
  d = config.diffusion
  return losses.BlockDiffusionObjective(
      block_size=d.block_size, mask_id=mask_id,
      schedule=schedules.make_schedule(d.schedule, d.eps),
      noise=schedules.NoiseRange(d.beta, d.omega), antithetic=d.antithetic,
      load_balance_weight=config.model.moe.load_balance_weight,
      z_loss_weight=config.model.moe.z_loss_weight)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field; silent when the config is sound."""
  d, m, t = config.diffusion, config.model, config.train
  if d.block_size < 1:
    raise ValueError(f"diffusion.block_size must be >= 1, got {d.block_size}")
  if config.data.seq_len % d.block_size:
    raise ValueError(f"data.seq_len={config.data.seq_len} is not a multiple of "
                     f"diffusion.block_size={d.block_size}")
  if config.data.batch_size < 1:
    raise ValueError(f"data.batch_size must be >= 1, got {config.data.batch_size}")
  if t.grad_accum_steps < 1 or config.data.batch_size % t.grad_accum_steps:
    raise ValueError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                     f"data.batch_size={config.data.batch_size}")
  for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if t[name] < 1:
      raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if t.learning_rate <= 0:
    raise ValueError(f"train.learning_rate must be > 0, got {t.learning_rate}")
  schedules.make_schedule(d.schedule, d.eps)
  schedules.NoiseRange(d.beta, d.omega)
  rope.RopeScaling(type=m.rope_scaling.type, factor=m.rope_scaling.factor)
  if m.moe.router_mode not in moe.ROUTER_MODES:
    raise ValueError(f"model.moe.router_mode must be one of {moe.ROUTER_MODES}, "
                     f"got {m.moe.router_mode!r}")
  # The dataclasses check the rest (top_k <= num_experts, head counts, dtype, impls).
  model_config(config, vocab_size=m.vocab_size or 1)
