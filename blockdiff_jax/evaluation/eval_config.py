"""The ``eval`` config section (kept apart from ``evaluate`` so configs import it cheaply)."""

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


def long_context_lengths(config: ml_collections.ConfigDict) -> list[int]:
  """The prompt lengths of the long_context task (``eval.long_context_lengths``)."""
  e = config.eval
  if e.long_context_lengths:
    return [int(n) for n in e.long_context_lengths.split(",")]
  return [config.data.seq_len * 2**i for i in range(5)]
