"""The ``eval`` config section (kept apart from ``evaluate`` so configs import it cheaply)."""

import math

import ml_collections

TASKS = ("likelihood", "synthetic", "humaneval", "humaneval_infilling", "throughput",
         "long_context")


def default_eval_config() -> ml_collections.ConfigDict:
  """Defaults of the ``eval`` config section."""
  e = ml_collections.ConfigDict()
  e.tasks = "likelihood,throughput"  # Comma-separated, from evaluate.TASKS.
  e.decoders = "threshold:0.9,ar"  # policy:value items; "ar" = one token per forward.
  e.likelihood_batches = 4  # Validation batches for the NELBO.
  e.noise_samples = 4  # Noise draws per sequence for the NELBO.
  e.num_examples = 64  # Synthetic examples (and throughput prompts).
  e.batch_size = 16  # Prompts decoded together.
  e.max_new_tokens = 128  # Generated tokens per code prompt at most.
  e.max_len = 2048  # Context limit of prompt + generation for code tasks.
  e.humaneval_problems = 164  # First N HumanEval problems (164 = all).
  e.samples_per_problem = 1  # Completions per problem (pass@k needs k <= this).
  e.ks = "1"  # pass@k values.
  e.infilling_kinds = "single-line,multi-line"  # HumanEval-infilling task kinds.
  e.infilling_mode = "inplace"  # inplace (span of the reference length) | fim.
  e.timeout_s = 3.0  # Sandbox time limit per program.
  e.workers = 2  # Sandboxes at once.
  # long_context: passkey / key-value prompts (data/long_context.py), exact match.
  e.long_context_tasks = "passkey,kv_recall"  # Comma-separated data.long_context.TASKS.
  # Comma-separated prompt lengths; "" = data.seq_len times 1, 2, 4, 8 and 16.
  e.long_context_lengths = ""
  e.long_context_depths = "0.1,0.5,0.9"  # Needle depths (fraction of the haystack).
  e.long_context_per_cell = 4  # Prompts per (task, length, depth).
  e.long_context_num_pairs = 4  # Key-value pairs per kv_recall prompt.
  e.long_context_seed = 0  # Needle seed (fixed, so models are compared on equal prompts).
  e.long_context_max_new_tokens = 16  # Answer tokens decoded at most.
  return e


_POSITIVE_INTS = ("likelihood_batches", "noise_samples", "num_examples", "batch_size",
                  "max_new_tokens", "max_len", "humaneval_problems", "samples_per_problem",
                  "workers", "long_context_per_cell", "long_context_num_pairs",
                  "long_context_max_new_tokens")
INFILLING_MODES = ("inplace", "fim")


def int_list(e: ml_collections.ConfigDict, name: str) -> list[int]:
  """The integers of the comma-separated field ``eval.<name>`` (blank items skipped).

  Raises:
    ValueError: naming the field, on a non-integer or an integer < 1.
  """
  try:
    values = [int(v) for v in str(e[name]).split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"eval.{name} must be comma-separated integers, got {e[name]!r}") from None
  if any(v < 1 for v in values):
    raise ValueError(f"eval.{name} must hold integers >= 1, got {e[name]!r}")
  return values


def validate(e: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``eval`` field (before any model loads).

  Task names and decoders are checked by ``evaluate`` (it owns their registries).
  """
  for name in _POSITIVE_INTS:
    if not isinstance(e[name], int) or isinstance(e[name], bool) or e[name] < 1:
      raise ValueError(f"eval.{name} must be an integer >= 1, got {e[name]!r}")
  if e.max_new_tokens >= e.max_len:
    raise ValueError(f"eval.max_new_tokens={e.max_new_tokens} leaves no room for a prompt "
                     f"in eval.max_len={e.max_len}")
  ks = int_list(e, "ks")
  if not ks:
    raise ValueError("eval.ks is empty; give pass@k values such as '1'")
  if max(ks) > e.samples_per_problem:
    raise ValueError(f"eval.ks={e.ks!r} asks for pass@{max(ks)} from "
                     f"eval.samples_per_problem={e.samples_per_problem} samples")
  # None raised a bare TypeError naming no field.
  if not isinstance(e.timeout_s, (int, float)) or not 0 < e.timeout_s < math.inf:  # And NaN.
    raise ValueError(f"eval.timeout_s must be a finite number > 0, got {e.timeout_s}")
  if e.infilling_mode not in INFILLING_MODES:
    raise ValueError(f"eval.infilling_mode must be one of {INFILLING_MODES}, "
                     f"got {e.infilling_mode!r}")
  int_list(e, "long_context_lengths")
  # Imported here: configs import this module, and only validation needs the base.
  from blockdiff_jax.data import long_context  # pylint: disable=g-import-not-at-top
  base = long_context.TRAINING_SEED_BASE
  seed = e.long_context_seed
  # Negative seeds fail numpy's generator only once the task runs; seeds from the base
  # up are the training streams' needles (data/long_context.py).
  if (not isinstance(seed, int) or isinstance(seed, bool)
      or not 0 <= seed < base):
    raise ValueError(f"eval.long_context_seed must be an integer in [0, {base}), "
                     f"got {seed!r}")
  try:
    depths = [float(d) for d in str(e.long_context_depths).split(",")]  # None: no split.
  except ValueError:
    raise ValueError(f"eval.long_context_depths must be comma-separated numbers, "
                     f"got {e.long_context_depths!r}") from None
  if not all(0.0 <= d <= 1.0 for d in depths):
    raise ValueError(f"eval.long_context_depths must be in [0, 1], got {e.long_context_depths!r}")


def long_context_lengths(config: ml_collections.ConfigDict) -> list[int]:
  """The prompt lengths of the long_context task (``eval.long_context_lengths``), each
  once (a repeated length would weigh its prompts double in the overall exact match)."""
  e = config.eval
  lengths = list(dict.fromkeys(int_list(e, "long_context_lengths")))
  if lengths:
    return lengths
  return [config.data.seq_len * 2**i for i in range(5)]
