"""The ``diffusion`` config section, its validation and the objective it gives."""

import math
import numbers
from typing import Any, Callable

import ml_collections

from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules


OBJECTIVES = ("bd3", "fastdllm", "introspective", "ar")
BLOCK_ATTENTION = ("auto", "bidirectional", "causal")
# Objectives that reuse a pretrained AR head, so they need diffusion.token_shift=True.
SHIFTED_OBJECTIVES = ("fastdllm", "introspective", "ar")


def default_diffusion_config() -> ml_collections.ConfigDict:
  """Defaults of the ``diffusion`` section (BD3-LM with a log-linear schedule)."""
  d = ml_collections.ConfigDict()
  d.block_size = 8  # Tokens per block (1 = AR, seq_len = MDLM).
  d.schedule = "loglinear"  # Noise schedule.
  d.eps = 1e-3  # Smallest t (bounds the 1/t weight).
  d.beta = 1e-3  # Lower clip of the training noise level t.
  d.omega = 1.0  # Upper clip of the training noise level t.
  d.antithetic = True  # Stratify t across the batch.
  # The logits at position i predict token i+1 (a pretrained AR model's head, reused);
  # False = the logits at i predict token i (a model trained from scratch by BD3-LM).
  d.token_shift = False
  # bd3: BD3-LM NELBO | fastdllm: Fast-dLLM v2 (token shift + complementary masks, plain
  # masked CE over response tokens) | introspective: I-DLM (all-MASK causal noisy blocks of
  # isd_stride tokens; CE_noisy + alpha * CE_clean). The last two need token_shift=True.
  d.objective = "bd3"
  d.isd_stride = 4  # Introspective: noisy block length N (the ISD decoding stride).
  d.clean_weight = 0.2  # Introspective: alpha in CE_noisy + alpha * CE_clean.
  # Introspective: K > 0 noisy blocks per row at random scored anchors instead of a noisy
  # copy of every block; the clean stream then runs without gradient when that is exact
  # (gated LoRA with train.trainable=lora), so the backward covers K*N tokens, not 2L.
  d.isd_anchors = 0
  # Attention among the tokens of one block: auto = the objective's own (causal noisy
  # blocks for introspective, bidirectional otherwise) | bidirectional | causal (both
  # streams, as the AR model attends: an ablation of Fast-dLLM v2's bidirectional blocks;
  # with MoE block routing a token's experts still depend on its whole block).
  d.block_attention = "auto"
  return d


def introspective_objective(config: ml_collections.ConfigDict,
                            mask_id: int) -> introspective.IntrospectiveObjective:
  """The I-DLM objective of a config with ``diffusion.objective = "introspective"``."""
  d = config.diffusion
  if d.get("objective", "bd3") != "introspective":
    raise ValueError(f"diffusion.objective is {d.get('objective', 'bd3')!r}, not 'introspective'")
  anchors = d.get("isd_anchors", 0)
  lora = config.model.get("lora") if config.get("model") is not None else None
  # Exact only when no trainable weight acts on a clean token: gated adapters, base frozen.
  detach = bool(anchors and lora is not None and lora.get("rank", 0) and lora.get("gated")
                and config.get("train", {}).get("trainable", "all") == "lora")
  return introspective.IntrospectiveObjective(
      stride=d.get("isd_stride", 4), mask_id=mask_id, clean_weight=d.get("clean_weight", 0.2),
      anchors=anchors, detach_clean=detach)


def objective(config: ml_collections.ConfigDict, mask_id: int):
  """The training objective of an experiment config (BD3-LM, Fast-dLLM v2, I-DLM or AR)."""
  d = config.diffusion
  kind = d.get("objective", "bd3")
  if kind in SHIFTED_OBJECTIVES and not d.get("token_shift", False):
    raise ValueError(f"diffusion.objective={kind!r} needs diffusion.token_shift=True")
  if kind == "ar":
    return autoregressive.AutoregressiveObjective(mask_id=mask_id)
  if kind == "introspective":
    if not d.get("token_shift", False):
      raise ValueError("diffusion.objective='introspective' needs diffusion.token_shift=True")
    return introspective_objective(config, mask_id)
  if kind == "fastdllm":
    if not d.get("token_shift", False):
      raise ValueError("diffusion.objective='fastdllm' needs diffusion.token_shift=True")
    return fastdllm.FastDLLMObjective(
        block_size=d.block_size, mask_id=mask_id,
        schedule=schedules.make_schedule(d.schedule, d.eps),
        noise=schedules.NoiseRange(d.beta, d.omega), antithetic=d.antithetic)
  if d.get("token_shift", False):
    raise ValueError("diffusion.token_shift=True (a pretrained AR model) needs a token-shift "
                     "objective; the BD3-LM objective predicts token i at position i")
  return losses.BlockDiffusionObjective(
      block_size=d.block_size, mask_id=mask_id,
      schedule=schedules.make_schedule(d.schedule, d.eps),
      noise=schedules.NoiseRange(d.beta, d.omega), antithetic=d.antithetic)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``diffusion`` field."""
  d = config.diffusion
  if d.get("objective", "bd3") not in OBJECTIVES:
    raise ValueError(f"diffusion.objective must be one of {OBJECTIVES}, got {d.objective!r}")
  # None failed below in a bare TypeError naming no field, and True (ml_collections lets
  # a bool into an int field) passed as block_size=1, silently an AR model.
  if isinstance(d.block_size, bool) or not isinstance(d.block_size, numbers.Integral):
    raise ValueError(f"diffusion.block_size must be an integer, got {d.block_size!r}")
  for name in ("eps", "beta", "omega"):
    if isinstance(d[name], bool) or not isinstance(d[name], numbers.Real):
      raise ValueError(f"diffusion.{name} must be a number, got {d[name]!r}")
  # ml_collections lets None into a bool field: antithetic=None silently turned the
  # stratified noise off, and token_shift=None read as False.
  for name, default in (("antithetic", True), ("token_shift", False)):
    if not isinstance(d.get(name, default), bool):
      raise ValueError(f"diffusion.{name} must be True or False, got {d.get(name)!r}")
  seq_len = config.data.seq_len  # Checked here too: this section is validated first.
  # Before its first use: the introspective checks below read seq_len - 1.
  if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
    raise ValueError(f"data.seq_len must be an integer, got {seq_len!r}")
  if d.get("objective", "bd3") == "introspective":
    # An infinite weight made the loss inf: the run stopped on "loss or gradient is
    # NaN/Inf", naming no field (NaN and negatives are refused by the objective).
    if (isinstance(d.clean_weight, bool) or not isinstance(d.clean_weight, numbers.Real)
        or math.isinf(d.clean_weight)):
      raise ValueError(f"diffusion.clean_weight must be a finite number, "
                       f"got {d.clean_weight!r}")
    if not d.get("token_shift", False):
      raise ValueError("diffusion.objective='introspective' needs diffusion.token_shift=True")
    # Refuses a stride or anchor count that is not an integer (None, True), naming it.
    introspective.IntrospectiveObjective(stride=d.isd_stride, mask_id=0,
                                         clean_weight=d.clean_weight,
                                         anchors=d.get("isd_anchors", 0))
    # Anchors are distinct positions with a next token (0 .. seq_len - 2); asking for
    # more fails deep inside the step's top_k without naming the field.
    if d.get("isd_anchors", 0) > config.data.seq_len - 1:
      raise ValueError(f"diffusion.isd_anchors={d.isd_anchors} must be <= data.seq_len - 1 "
                       f"= {config.data.seq_len - 1}")
  attention = d.get("block_attention", "auto")
  if attention not in BLOCK_ATTENTION:
    raise ValueError(f"diffusion.block_attention must be one of {BLOCK_ATTENTION}, "
                     f"got {attention!r}")
  if attention == "bidirectional" and d.get("objective", "bd3") == "introspective":
    raise ValueError("diffusion.block_attention='bidirectional' contradicts "
                     "diffusion.objective='introspective', whose noisy blocks are causal")
  if d.block_size < 1:
    raise ValueError(f"diffusion.block_size must be >= 1, got {d.block_size}")
  # The AR objective has no blocks (its loss never reads block_size); summary slots do.
  summary = (config.get("model") or {}).get("summary") or {}
  ar_only = d.get("objective", "bd3") == "ar" and not summary.get("num_slots", 0)
  if config.data.seq_len % d.block_size and not ar_only:
    raise ValueError(f"data.seq_len={config.data.seq_len} is not a multiple of "
                     f"diffusion.block_size={d.block_size}")
  schedules.make_schedule(d.schedule, d.eps)
  schedules.NoiseRange(d.beta, d.omega)
  kind = d.get("objective", "bd3")
  if kind not in OBJECTIVES:
    raise ValueError(f"diffusion.objective must be one of {OBJECTIVES}, got {kind!r}")
  if kind in SHIFTED_OBJECTIVES and not d.get("token_shift", False):
    raise ValueError(f"diffusion.objective={kind!r} needs diffusion.token_shift=True, "
                     f"got {d.get('token_shift', False)}")


def loss_functions(obj: Any) -> tuple[Callable, Callable]:
  """``(loss_fn, corrupt_fn)`` of an objective (BD3-LM, Fast-dLLM v2, I-DLM or AR).

  ``loss_fn(apply_fn, params, batch, rng, obj, corrupted=None) -> (loss, metrics)``;
  ``corrupt_fn(rng, batch, obj)`` draws the noise of a whole batch (split by rows into
  micro-batches under gradient accumulation).
  """
  if isinstance(obj, fastdllm.FastDLLMObjective):
    return fastdllm.fastdllm_loss, fastdllm.corrupt
  if isinstance(obj, introspective.IntrospectiveObjective):
    return introspective.introspective_loss, introspective.corrupt
  if isinstance(obj, autoregressive.AutoregressiveObjective):
    return autoregressive.autoregressive_loss, autoregressive.corrupt
  return losses.block_diffusion_loss, losses.corrupt
