"""Parameter counts and model FLOPs, derived from shapes alone (no allocation)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import lora
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


def _two_stream_pass(cfg: transformer.TransformerConfig, seq_len: int) -> tuple[int, float]:
  """(trunk positions, keys per position) of one ``[x_t ; x_0]`` pass of ``seq_len``.

  2L tokens with dense 2L-key attention (what the XLA path computes). With summary
  tokens the trunk also runs the clean stream's (L/B)·S slots (``build.make_apply``
  passes ``summary="bd3"`` to every objective on this layout), and the structured
  path scores each token against its own block, its window and the summary bank, and
  each slot against its clean block and sibling slots only
  (``summary_attention.structured_attention``): ``keys`` is then the mean over
  positions, so ``positions * keys`` is the number of logits.
  """
  positions = keys = 2 * seq_len
  if cfg.summary is not None:
    su = cfg.summary
    bank = seq_len // su.block_size * su.num_slots
    positions = keys = 2 * seq_len + bank
    if cfg.attention_impl == "structured":
      # Charging the slots the tokens' (W+1)·B + bank keys overcounted their B + S.
      logits = (2 * seq_len * ((su.window_blocks + 1) * su.block_size + bank)
                + bank * (su.block_size + su.num_slots))
      keys = logits / positions
  return positions, keys


TRAINABLE = ("all", "lora", "moe")

# Where a projection sits in a block: attention q/k/v or output ("out"), feed-forward
# input (gate/up, the MoE router and shared gate) or output ("down", the experts' "wo").
_FFN_OUT = ("down", "wo")
_EXPERTS = ("wi_gate", "wi_up", "wo")  # Routed: top_k of num_experts run per token.


def _trainable_mode(frozen_base: bool, trainable: str | None) -> str:
  mode = trainable if trainable is not None else ("lora" if frozen_base else "all")
  if mode not in TRAINABLE:
    raise ValueError(f"trainable must be one of {TRAINABLE} (train.trainable), got {mode!r}")
  return mode


def _trains(names: list[str], mode: str) -> bool:
  """Whether the weight at ``names`` gets a weight gradient under ``train.trainable=mode``."""
  if mode == "all":
    return True
  if mode == "moe":
    return "moe" in names
  return lora.is_lora_path(names)


def layer_matmul_params(cfg: transformer.TransformerConfig, mode: str = "all") -> list[dict]:
  """Per layer, the active matmul weights of each projection group and how many train.

  Returns one dict per layer mapping ``"qkv"``, ``"o"``, ``"ffn_in"``, ``"ffn_out"`` to
  ``(active, trainable, any_trains)`` parameter counts: routed experts count
  ``top_k / num_experts`` of their weights, norm scales and biases (elementwise) are
  left out, and a LoRA adapter counts with the projection it sits on. ``mode="lora"``
  on a config without adapters (``cfg.lora`` None) takes them as on every dense
  projection, with a negligible parameter count.
  """
  groups = [{g: [0.0, 0.0, False] for g in ("qkv", "o", "ffn_in", "ffn_out")}
            for _ in range(cfg.num_layers)]
  stacks, first = {}, 0  # stack_<seg> (scan_layers) -> (its first layer, its layers).
  for seg, (_, n) in enumerate(cfg.layer_segments()):
    stacks[f"stack_{seg}"] = (first, n)
    first += n
  for path, x in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] in ("scale", "bias") or not names[0].startswith(("layer_", "stack_")):
      continue
    size = float(np.prod(x.shape))
    if names[0].startswith("stack_"):
      lo, n = stacks[names[0]]
      owners, size = range(lo, lo + n), size / n
    else:
      owners = [int(names[0].split("_")[1])]
    if "moe" in names and names[-1] in _EXPERTS:
      size *= cfg.moe.top_k / cfg.moe.num_experts
    if "attention" in names:
      group = "o" if "out" in names else "qkv"
    else:
      group = "ffn_out" if any(nm in _FFN_OUT for nm in names) else "ffn_in"
    trains = _trains(names, mode)
    implied = mode == "lora" and cfg.lora is None and "moe" not in names
    for i in owners:
      groups[i][group][0] += size
      groups[i][group][1] += size * trains
      groups[i][group][2] |= trains or implied
  return [{g: tuple(v) for g, v in layer.items()} for layer in groups]


def pass_flops(cfg: transformer.TransformerConfig, positions: int, keys: int,
               head_positions: int, trainable: str = "all") -> tuple[float, float]:
  """(forward, backward) matmul FLOPs of one pass of ``positions`` tokens.

  Each token attends to ``keys`` keys and the head runs on ``head_positions`` of them.
  The backward follows reverse-mode autodiff with frozen weights behind stop_gradient:
  a matmul forms its weight gradient only when the weight trains, and its input
  gradient only when the input depends on a trainable weight. With every weight
  training (the embedding too) that is 2x forward; with ``trainable="moe"`` (an
  upcycled model: routers and experts only) the attention, dense MLP and head weights
  form no weight gradient and the layers before the first MoE layer no gradient at all;
  with ``"lora"`` only the adapters form weight gradients. The attention scores
  (QK^T, PV) multiply two activations: both gradients are formed whenever they depend
  on a trainable weight.
  """
  mode = _trainable_mode(False, trainable)
  fwd = bwd = 0.0
  live = mode == "all"  # The embedding trains: every activation carries a gradient.
  scores = 2.0 * 2.0 * keys * cfg.num_heads * cfg.head_dim * positions
  for layer in layer_matmul_params(cfg, mode):
    mm = {g: 2.0 * positions * v[0] for g, v in layer.items()}
    wgrad = {g: 2.0 * positions * v[1] for g, v in layer.items()}
    fwd += sum(mm.values()) + scores
    bwd += sum(wgrad.values())
    bwd += mm["qkv"] if live else 0.0
    live = live or layer["qkv"][2]
    bwd += 2.0 * scores if live else 0.0
    bwd += mm["o"] if live else 0.0
    live = live or layer["o"][2]
    bwd += mm["ffn_in"] if live else 0.0
    hidden = live or layer["ffn_in"][2]
    bwd += mm["ffn_out"] if hidden else 0.0
    live = hidden or layer["ffn_out"][2]
  head = 2.0 * cfg.vocab_size * cfg.d_model * head_positions
  fwd += head
  bwd += (head if live else 0.0) + (head if mode == "all" else 0.0)
  return fwd, bwd


def train_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                     frozen_base: bool = False, trainable: str | None = None) -> float:
  """Model FLOPs of one BD3-LM train step (forward + backward, ``pass_flops``).

  ``trainable`` is ``train.trainable`` ("all", "lora" or "moe"); without it,
  ``frozen_base`` means "lora" (the base weights enter through stop_gradient).
  With every weight training the step is 3x forward; a frozen weight forms no weight
  gradient (``pass_flops``).

  The vectorized pass runs 2L tokens through the trunk (plus the summary slots,
  ``_two_stream_pass``) and the head only on the L noisy tokens.
  """
  mode = _trainable_mode(frozen_base, trainable)
  positions, keys = _two_stream_pass(cfg, seq_len)
  return batch * sum(pass_flops(cfg, positions, keys, seq_len, mode))


def fastdllm_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                        complementary: bool, frozen_base: bool,
                        trainable: str | None = None) -> float:
  """FLOPs of one Fast-dLLM v2 train step, forward and backward.

  Each row runs twice with complementary masks (2B rows of ``[x_t ; x_0]``, with the
  summary slots of a summary-token model: ``_two_stream_pass``), and the token shift
  reads the head's output on both streams (2L positions, not L). The backward is
  ``pass_flops``' (``trainable`` or ``frozen_base`` as in ``train_step_flops``).
  """
  mode = _trainable_mode(frozen_base, trainable)
  rows = 2 * batch if complementary else batch
  # The same [x_t ; x_0] layout as BD3-LM: a summary-token model runs its slots too
  # (they carry no loss, so the head still reads the 2L token positions only).
  positions, keys = _two_stream_pass(cfg, seq_len)
  return rows * sum(pass_flops(cfg, positions, keys, 2 * seq_len, mode))


def autoregressive_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                              frozen_base: bool, trainable: str | None = None) -> float:
  """FLOPs of one AR SFT train step: L causal tokens, forward and backward
  (``pass_flops``; ``trainable`` or ``frozen_base`` as in ``train_step_flops``)."""
  mode = _trainable_mode(frozen_base, trainable)
  return batch * sum(pass_flops(cfg, seq_len, seq_len, seq_len, mode))


def introspective_step_flops(cfg: transformer.TransformerConfig, batch: int, seq_len: int,
                             noisy_tokens: int, detach_clean: bool, frozen_base: bool,
                             anchored: bool = True, trainable: str | None = None) -> float:
  """FLOPs one I-DLM train step computes: the clean stream, the noisy tokens, backward.

  The backward is ``pass_flops``' (``trainable`` or ``frozen_base`` as in
  ``train_step_flops``); with ``detach_clean`` it runs over the noisy tokens only.
  Without anchors (``anchored=False``) the step is one pass of ``[noisy ; x_0]``: 2L
  tokens that each read 2L keys on the dense path, the head on all of them
  (``noisy_tokens`` and ``detach_clean`` do not apply).
  """
  mode = _trainable_mode(frozen_base, trainable)
  if not anchored:
    return batch * sum(pass_flops(cfg, 2 * seq_len, 2 * seq_len, 2 * seq_len, mode))
  clean = pass_flops(cfg, seq_len, seq_len, seq_len, mode)
  noisy = pass_flops(cfg, noisy_tokens, seq_len + noisy_tokens, noisy_tokens, mode)
  if detach_clean:
    return batch * (clean[0] + sum(noisy))
  return batch * (sum(clean) + sum(noisy))
