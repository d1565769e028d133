"""Parameter counts and model FLOPs, derived from shapes alone (no allocation)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import transformer


def param_shapes(cfg: transformer.TransformerConfig, length: int = 8) -> Any:
  """Unboxed ShapeDtypeStructs of the parameters, via ``jax.eval_shape``."""
  model = transformer.Transformer(cfg)
  tokens = jnp.zeros((1, length), jnp.int32)
  meta = masks.make_meta(jnp.arange(length)[None], 1, masks.CLEAN)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, meta))["params"]
  return nn.unbox(shapes)


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def expert_params(cfg: transformer.TransformerConfig) -> int:
  """Parameters of all routed experts (excluding routers and shared experts)."""
  if cfg.moe is None:
    return 0
  return cfg.num_moe_layers * cfg.moe.num_experts * 3 * cfg.d_model * cfg.moe.expert_dim


def elementwise_params(shapes: Any) -> int:
  """Norm scales and biases in ``param_shapes``: each multiplies or adds per element."""
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return int(sum(np.prod(x.shape) for path, x in flat
                 if getattr(path[-1], "key", None) in ("scale", "bias")))


def param_counts(cfg: transformer.TransformerConfig) -> dict:
  """Total, embedding, active-per-token and elementwise (norm, bias) parameter counts."""
  shapes = param_shapes(cfg)
  total = count(shapes)
  embed = cfg.vocab_size * cfg.d_model
  experts = expert_params(cfg)
  active_experts = experts * cfg.moe.top_k // cfg.moe.num_experts if cfg.moe else 0
  return {"total": total, "embedding": embed, "experts": experts,
          "active": total - experts + active_experts,
          "elementwise": elementwise_params(shapes)}


def forward_flops_per_token(cfg: transformer.TransformerConfig, kv_length: int,
                            with_head: bool = True) -> float:
  """Matmul FLOPs of one token's forward pass attending to ``kv_length`` keys.

  Counts 2 FLOPs per multiply-add of the active weight matrices (the input embedding is
  a lookup, not a matmul; norm scales and biases act elementwise) plus QK^T and PV over
  all ``kv_length`` keys.
  """
  counts = param_counts(cfg)
  head = cfg.vocab_size * cfg.d_model
  trunk = (counts["active"] - counts["elementwise"] - counts["embedding"]
           - (0 if cfg.tie_embeddings else head))
  if cfg.summary is not None:  # the slot table is a lookup too
    trunk -= cfg.summary.num_slots * cfg.d_model
  matmul = trunk + (head if with_head else 0)
  attn = 2 * 2 * kv_length * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return 2.0 * matmul + attn


def _two_stream_pass(cfg: transformer.TransformerConfig, seq_len: int) -> tuple[int, int]:
  """(trunk positions, keys per position) of one ``[x_t ; x_0]`` pass of ``seq_len``.

  2L tokens with dense 2L-key attention (what the XLA path computes). With summary
  tokens the trunk also runs the clean stream's (L/B)·S slots (``build.make_apply``
  passes ``summary="bd3"`` to every objective on this layout), and the structured
  path scores each query against its window and the summary bank only.
  """
  positions = keys = 2 * seq_len
  if cfg.summary is not None:
    su = cfg.summary
    bank = seq_len // su.block_size * su.num_slots
    positions = keys = 2 * seq_len + bank
    if cfg.attention_impl == "structured":
      keys = (su.window_blocks + 1) * su.block_size + bank
  return positions, keys


def train_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                     frozen_base: bool = False) -> float:
  """Model FLOPs of one BD3-LM train step (forward + backward = 3x forward).

  With ``frozen_base`` (LoRA: the base weights enter through stop_gradient) the
  backward forms activation gradients only: 2x forward in all.

  The vectorized pass runs 2L tokens through the trunk (plus the summary slots,
  ``_two_stream_pass``) and the head only on the L noisy tokens.
  """
  positions, keys = _two_stream_pass(cfg, seq_len)
  trunk = forward_flops_per_token(cfg, keys, with_head=False) * positions
  head = 2.0 * cfg.vocab_size * cfg.d_model * seq_len
  return (2.0 if frozen_base else 3.0) * batch * (trunk + head)


def fastdllm_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                        complementary: bool, frozen_base: bool) -> float:
  """FLOPs of one Fast-dLLM v2 train step, forward and backward.

  Each row runs twice with complementary masks (2B rows of ``[x_t ; x_0]``, with the
  summary slots of a summary-token model: ``_two_stream_pass``), and the token shift
  reads the head's output on both streams (2L positions, not L). The
  backward costs one forward with a frozen base and two otherwise.
  """
  rows = 2 * batch if complementary else batch
  # The same [x_t ; x_0] layout as BD3-LM: a summary-token model runs its slots too
  # (they carry no loss, so the head still reads the 2L token positions only).
  positions, keys = _two_stream_pass(cfg, seq_len)
  per_row = (forward_flops_per_token(cfg, keys, with_head=False) * positions
             + 2.0 * cfg.vocab_size * cfg.d_model * 2 * seq_len)
  return rows * (2.0 if frozen_base else 3.0) * per_row


def autoregressive_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                              frozen_base: bool) -> float:
  """FLOPs of one AR SFT train step: L causal tokens, forward and backward.

  The backward costs one forward when the base is frozen (activation gradients only)
  and two otherwise.
  """
  forward = forward_flops_per_token(cfg, seq_len, with_head=True) * seq_len
  return batch * (2.0 if frozen_base else 3.0) * forward


def introspective_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                             noisy_tokens: int, detach_clean: bool, frozen_base: bool,
                             anchored: bool = True) -> float:
  """FLOPs one I-DLM train step computes: the clean stream, the noisy tokens, backward.

  The backward costs one forward when the base is frozen (activation gradients only; the
  weight gradients are never formed) and two otherwise; with ``detach_clean`` it runs
  over the noisy tokens only. Without anchors (``anchored=False``) the step is one pass
  of ``[noisy ; x_0]``: 2L tokens that each read 2L keys on the dense path, the head on
  all of them (``noisy_tokens`` and ``detach_clean`` do not apply).
  """
  backward = 1.0 if frozen_base else 2.0
  if not anchored:
    return batch * (1.0 + backward) * forward_flops_per_token(
        cfg, 2 * seq_len, with_head=True) * 2 * seq_len
  clean = forward_flops_per_token(cfg, seq_len, with_head=True) * seq_len
  noisy = forward_flops_per_token(cfg, seq_len + noisy_tokens, with_head=True) * noisy_tokens
  if detach_clean:
    return batch * (clean + (1.0 + backward) * noisy)
  return batch * (1.0 + backward) * (clean + noisy)
