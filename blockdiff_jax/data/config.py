"""The ``data`` config section and its validation."""

import ml_collections

from blockdiff_jax.data import long_context


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data settings that config files start from and override."""
  c = ml_collections.ConfigDict()
  # "stdlib" (this interpreter's standard-library .py files), "files" (see
  # `paths`), "synthetic" (verifiable prompt/answer tasks), "sft" (packed
  # prompt/response pairs, see data/sft.py and the sft_* fields) or "long_context"
  # (passkey / key-value retrieval prompts, see data/long_context.py and the
  # long_context_* fields; the answer's blocks are scored, sized by sft_block_multiple).
  c.corpus = "stdlib"
  # corpus="files": comma-separated files, folders (recursive .py .txt .md
  # .jsonl .json) or globs.
  c.paths = ""
  # Field holding the text in each line of a .jsonl file.
  c.text_field = "text"
  # "byte", "bpe" (trained on the train split, cached in workdir) or the path
  # of a tokenizer.json.
  c.tokenizer = "byte"
  # Vocabulary size (specials included) when tokenizer="bpe".
  c.bpe_vocab_size = 4096
  # Share of documents (by sha1 of their path) held out for validation.
  c.validation_fraction = 0.02
  # Per-split cap on the UTF-8 bytes loaded, in sorted order; 0 = no cap.
  c.max_bytes = 0
  # corpus="synthetic": comma-separated tasks (sort, add, copy_edit), mixed
  # uniformly.
  c.synthetic_tasks = "sort,add,copy_edit"
  # Difficulty of the synthetic tasks: list length / operand digits / string
  # length.
  c.synthetic_digits = 5
  # Seed of the synthetic example streams (validation uses its own stream).
  # Window shuffling uses the seed passed to build_dataset.
  c.seed = 0
  # corpus="sft": "docstrings" (pairs from the standard library's docstrings),
  # "synthetic" (the synthetic tasks), "distilled" (<workdir>/distill/*.jsonl from
  # --mode=distill: the model's own answers) or comma-separated JSONL files of
  # {"prompt", "response"} or {"messages": [...]} lines ("finished": false marks a
  # response cut at a limit: it gets no EOS). A comma-separated mix of these
  # ("distilled,synthetic") interleaves them, sft_max_examples from each.
  c.sft_source = "docstrings"
  c.sft_max_examples = 2000  # Examples per split read from each source; 0 = all.
  # Each example is padded to a multiple of this (set it to diffusion.block_size).
  c.sft_block_multiple = 32
  # Score the EOS padding after a response (teaches the model to stop).
  c.sft_score_padding = True
  # corpus="long_context": comma-separated tasks (passkey, kv_recall), cycled.
  c.long_context_tasks = "passkey,kv_recall"
  # Shortest prompt in tokens (lengths are uniform up to seq_len - 24); 0 = half of that.
  c.long_context_min_length = 0
  c.long_context_num_pairs = 4  # Key-value pairs per kv_recall prompt.
  # Also mask and score the prompt (language modelling on haystack and needles).
  c.long_context_score_prompt = False
  c.seq_len = 64  # Tokens per training sequence (multiple of diffusion.block_size).
  c.batch_size = 8  # Sequences per step (global, across all devices).
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``data`` field."""
  if config.data.batch_size < 1:
    raise ValueError(f"data.batch_size must be >= 1, got {config.data.batch_size}")
  d = config.data
  if d.corpus == "long_context":
    for task in d.long_context_tasks.split(","):
      if task not in long_context.TASKS:
        raise ValueError(f"data.long_context_tasks: unknown task {task!r}; "
                         f"known: {long_context.TASKS}")
    if d.seq_len % d.sft_block_multiple:
      raise ValueError(f"data.sft_block_multiple={d.sft_block_multiple} (the block the "
                       f"answer is scored in) must divide data.seq_len={d.seq_len}")
  if d.corpus == "sft" and (d.sft_block_multiple < 1 or d.seq_len % d.sft_block_multiple):
    raise ValueError(f"data.sft_block_multiple={d.sft_block_multiple} must be >= 1 and "
                     f"divide data.seq_len={d.seq_len}")
