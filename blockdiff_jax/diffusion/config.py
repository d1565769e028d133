"""The ``diffusion`` config section, its validation and the objective it gives."""

import ml_collections

from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules


OBJECTIVES = ("bd3", "fastdllm", "introspective")


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
  # masked CE over response tokens) | introspective: I-DLM (CE_noisy + alpha * CE_clean; a
  # library objective, not yet wired into the trainer). The last two need token_shift=True.
  d.objective = "bd3"
  d.isd_stride = 4  # Introspective: noisy block length N (the ISD decoding stride).
  d.clean_weight = 0.2  # Introspective: alpha in CE_noisy + alpha * CE_clean.
  return d


def introspective_objective(config: ml_collections.ConfigDict,
                            mask_id: int) -> introspective.IntrospectiveObjective:
  """The I-DLM objective of a config with ``diffusion.objective = "introspective"``."""
  d = config.diffusion
  if d.get("objective", "bd3") != "introspective":
    raise ValueError(f"diffusion.objective is {d.get('objective', 'bd3')!r}, not 'introspective'")
  return introspective.IntrospectiveObjective(
      stride=d.get("isd_stride", 4), mask_id=mask_id, clean_weight=d.get("clean_weight", 0.2))


def objective(config: ml_collections.ConfigDict, mask_id: int):
  """The training objective of an experiment config (BD3-LM or Fast-dLLM v2)."""
  d = config.diffusion
  kind = d.get("objective", "bd3")
  if kind == "introspective":
    raise ValueError("diffusion.objective='introspective' is not wired into the trainer yet; "
                     "use diffusion.introspective.introspective_loss directly")
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
  if d.get("objective", "bd3") == "introspective":
    if not d.get("token_shift", False):
      raise ValueError("diffusion.objective='introspective' needs diffusion.token_shift=True")
    introspective.IntrospectiveObjective(stride=d.isd_stride, mask_id=0,
                                         clean_weight=d.clean_weight)
  if d.block_size < 1:
    raise ValueError(f"diffusion.block_size must be >= 1, got {d.block_size}")
  if config.data.seq_len % d.block_size:
    raise ValueError(f"data.seq_len={config.data.seq_len} is not a multiple of "
                     f"diffusion.block_size={d.block_size}")
  schedules.make_schedule(d.schedule, d.eps)
  schedules.NoiseRange(d.beta, d.omega)
  kind = d.get("objective", "bd3")
  if kind not in OBJECTIVES:
    raise ValueError(f"diffusion.objective must be one of {OBJECTIVES}, got {kind!r}")
  if kind == "fastdllm" and not d.get("token_shift", False):
    raise ValueError("diffusion.objective='fastdllm' needs diffusion.token_shift=True, "
                     f"got {d.get('token_shift', False)}")
