"""The ``model`` config section, its validation and the static ``TransformerConfig`` it gives."""

import math

import ml_collections

from blockdiff_jax import masks
from blockdiff_jax.model import moe
from blockdiff_jax.model import rope
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle


def default_model_config() -> ml_collections.ConfigDict:
  """Defaults of the ``model`` section (a tiny MoE transformer)."""
  m = ml_collections.ConfigDict()
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
  m.rope_scaling.type = "none"  # none | linear | ntk | yarn | llama3 (like HF rope_scaling).
  m.rope_scaling.factor = 1.0  # Context extension factor.
  m.rope_scaling.original_max_position = 4096  # Pre-training context (YaRN, llama3).
  m.rope_scaling.low_freq_factor = 1.0  # llama3: turns per original context fully scaled below.
  m.rope_scaling.high_freq_factor = 4.0  # llama3: turns per original context kept above.
  # YaRN (defaults as transformers'): frequencies turning more than beta_fast times over
  # the original context are kept, fewer than beta_slow times divided by factor.
  m.rope_scaling.beta_fast = 32.0  # yarn: turns per original context kept above.
  m.rope_scaling.beta_slow = 1.0  # yarn: turns per original context fully scaled below.
  m.rope_scaling.truncate = True  # yarn: ramp bounds rounded to whole dims (False: gpt-oss).
  # yarn: q and k are multiplied by this temperature; None = derived from factor
  # (0.1 ln(factor) + 1, or the mscale/mscale_all_dim ratio when both are set).
  m.rope_scaling.attention_factor = ml_collections.config_dict.placeholder(float)
  m.rope_scaling.mscale = ml_collections.config_dict.placeholder(float)  # yarn (DeepSeek).
  m.rope_scaling.mscale_all_dim = ml_collections.config_dict.placeholder(float)  # yarn.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.dtype = "float32"  # Compute dtype (params stay fp32): float32 | bfloat16.
  # xla (materialized mask) | pallas (tiled kernel) | structured (summary tokens only:
  # each block against its window + the summary bank, n*sqrt(n); model/summary_attention.py).
  m.attention_impl = "xla"
  # Pallas kernels in the interpreter: None = decided by the backend (compiled on GPU,
  # interpreted elsewhere); True/False force it. Not saved into config.json.
  m.interpret = ml_collections.config_dict.placeholder(bool)
  m.scan_layers = False  # nn.scan over runs of identical layers (faster compiles).
  m.remat = False  # Rematerialize each block in the backward pass (saves memory).
  m.lora = lo = ml_collections.ConfigDict()
  lo.rank = 0  # LoRA rank on the dense projections; 0 = no adapters.
  lo.alpha = 16.0  # Adapter output scale numerator (scale = alpha / rank).
  lo.targets = ("q", "k", "v", "o", "gate", "up", "down")  # Projections with an adapter.
  lo.gated = True  # Adapter active only on MASK tokens (I-DLM); False = plain LoRA.
  lo.mask_id = -1  # MASK id of the gate (gated: -1 = the pretrained tokenizer's MASK id).
  # ChatDLM summary tokens (model/summary.py): every diffusion block of the clean
  # stream gets num_slots learned slots that read the block; a token reads its own
  # block and the window_blocks blocks before it in full, older blocks only through
  # their slots. Blocks of ~sqrt(n) tokens (diffusion.block_size) give n*sqrt(n) cost.
  m.summary = su = ml_collections.ConfigDict()
  su.num_slots = 0  # S: summary slots per block; 0 = no summary tokens (full attention).
  su.window_blocks = 2  # W >= 1: earlier blocks a token sees in full (with num_slots > 0).
  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 4  # Experts per MoE layer; 0 = dense model.
  e.top_k = 2  # Experts per token.
  e.expert_dim = 64  # Hidden width of each expert's SwiGLU.
  e.shared_expert_dim = 0  # Hidden width of an always-on shared expert; 0 = none.
  e.shared_expert_gate = False  # Scale the shared expert by sigmoid(x . w) (Qwen2-MoE).
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
  # With init.pretrained of a dense model: every MLP becomes num_experts identical
  # experts (as wide as the MLP) + a new router (sparse upcycling; model/upcycle.py).
  e.upcycle_from_dense = False
  return m


# Fields that describe the machine a run happens on, not the model: left out of
# the saved config so a checkpoint trained on one backend loads right on another.
BACKEND_FIELDS = ("interpret",)


def mask_spec(diffusion) -> masks.MaskSpec:
  """The attention inside a block that a ``diffusion`` config section asks for.

  ``block_attention="auto"``: I-DLM's introspective objective trains causal noisy blocks
  (its clean stream is causal through its block ids); every other objective keeps blocks
  bidirectional. ``"causal"``: both streams causal inside a block, the pattern of the AR
  model a token-shifted run starts from.
  """
  attention = diffusion.get("block_attention", "auto")
  if attention == "auto":
    return masks.MaskSpec(causal_noisy=diffusion.get("objective", "bd3") == "introspective")
  if attention == "bidirectional":
    return masks.MaskSpec()
  if attention == "causal":
    return masks.MaskSpec(causal_noisy=True, causal_clean=True)
  raise ValueError("diffusion.block_attention must be one of ('auto', 'bidirectional', "
                   f"'causal'), got {attention!r}")


def model_config(config: ml_collections.ConfigDict,
                 vocab_size: int | None = None) -> transformer.TransformerConfig:
  """The static TransformerConfig of an experiment config (vocab from the tokenizer if 0).

  The attention inside a block follows ``diffusion.block_attention`` (``mask_spec``).
  """
  diffusion = config.get("diffusion") or {}
  spec = mask_spec(diffusion)
  block_size = config.diffusion.block_size if "diffusion" in config else None
  return transformer.TransformerConfig.from_config(config.model, vocab_size, mask_spec=spec,
                                                   block_size=block_size)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``model`` field."""
  m = config.model
  # Sizes a shape error would otherwise report later without naming the field.
  for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    if m[name] < 1:
      raise ValueError(f"model.{name} must be >= 1, got {m[name]}")
  if m.vocab_size < 0:
    raise ValueError(f"model.vocab_size must be >= 0 (0 = the tokenizer's), got {m.vocab_size}")
  if m.moe.num_experts < 0:
    raise ValueError(f"model.moe.num_experts must be >= 0, got {m.moe.num_experts}")
  if m.moe.num_experts:
    for name in ("top_k", "expert_dim", "moe_every", "tile_size"):
      if m.moe[name] < 1:
        raise ValueError(f"model.moe.{name} must be >= 1, got {m.moe[name]}")
  for name in ("shared_expert_dim", "first_dense_layers", "capacity_factor",
               "load_balance_weight", "z_loss_weight"):
    # inf too: an infinite capacity overflows math.ceil, an infinite weight the loss.
    if not (m.moe[name] >= 0 and math.isfinite(m.moe[name])):
      raise ValueError(f"model.moe.{name} must be >= 0 and finite, got {m.moe[name]}")
  # theta <= 0 makes the RoPE frequencies NaN and eps <= 0 lets RMSNorm divide by zero:
  # both train to NaN at step 1.
  for name in ("rope_theta", "norm_eps"):
    if not (m[name] > 0 and math.isfinite(m[name])):
      raise ValueError(f"model.{name} must be > 0 and finite, got {m[name]}")
  rope.scaling_from_config(m.rope_scaling)  # Names a bad rope_scaling field.
  su = m.get("summary")
  if su is not None:
    if su.num_slots < 0:
      raise ValueError(f"model.summary.num_slots must be >= 0 (0 = off), got {su.num_slots}")
    if su.num_slots and su.window_blocks < 1:
      raise ValueError("model.summary.window_blocks must be >= 1 with summary tokens, "
                       f"got {su.window_blocks}")
    objective = (config.get("diffusion") or {}).get("objective", "bd3")
    if su.num_slots and objective == "introspective":
      raise ValueError("model.summary.num_slots > 0 needs the [x_t ; x_0] block layout; "
                       "diffusion.objective='introspective' (I-DLM's strided layout) has no "
                       "summary slots yet")
    # The AR objective's input is one clean stream of one-token blocks: the model
    # would lay the two-stream slot layout over it and cut each token off from
    # everything older than its window.
    if su.num_slots and objective == "ar":
      raise ValueError("model.summary.num_slots > 0 needs the [x_t ; x_0] block layout; "
                       "diffusion.objective='ar' (one causal clean stream) has no summary "
                       "slots")
  if m.attention_impl == "structured" and not (su is not None and su.num_slots):
    raise ValueError("model.attention_impl='structured' needs model.summary.num_slots > 0")
  if m.moe.router_mode not in moe.ROUTER_MODES:
    raise ValueError(f"model.moe.router_mode must be one of {moe.ROUTER_MODES}, "
                     f"got {m.moe.router_mode!r}")
  # Without a dense checkpoint to copy the flag would be dropped silently (resolving
  # the config only upcycles a pretrained model): the run would start from a random MoE.
  init = config.get("init")
  if m.moe.get("upcycle_from_dense", False) and not (init is not None
                                                     and init.get("pretrained")):
    raise ValueError("model.moe.upcycle_from_dense=True needs init.pretrained (the dense "
                     "checkpoint whose MLPs become the experts), got init.pretrained="
                     f"{(init or {}).get('pretrained', '')!r}")
  if m.moe.get("upcycle_from_dense", False):
    upcycle.check_layout(m.moe)
  # The dataclasses check the rest (top_k <= num_experts, head counts, dtype, impls).
  cfg = model_config(config, vocab_size=m.vocab_size or 1)
  lora = cfg.lora
  dense_mlp = any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  if lora is not None and not dense_mlp and set(lora.targets) <= {"gate", "up", "down"}:
    # Experts carry no adapters: every adapter would be missing and, with
    # train.trainable='lora', nothing would train.
    raise ValueError(f"model.lora.targets={tuple(lora.targets)!r} name only dense-MLP "
                     "projections, but every layer is MoE (experts have no adapters); "
                     "add an attention target (q, k, v, o)")
