"""The ``eval`` config section (kept apart from ``evaluate`` so configs import it cheaply)."""

import ml_collections

TASKS = ("likelihood", "synthetic", "humaneval", "humaneval_infilling", "throughput")


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
  return e
