"""The ``data`` config section and its validation."""

import os

import ml_collections

from blockdiff_jax.data import corpora
from blockdiff_jax.data import long_context
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import sft
from blockdiff_jax.data import synthetic
from blockdiff_jax.data import tokenizers

# corpora.load_documents reads the first three; pipeline.build_dataset builds the others.
CORPORA = corpora.CORPORA + ("sft", "long_context")


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
  # .jsonl .json; hidden .name folders and files are skipped, as globs skip them) or globs.
  c.paths = ""
  # Field holding the text in each line of a .jsonl file.
  c.text_field = "text"
  # "byte", "bpe" (trained on the train split, cached in workdir; training refuses a
  # cached one trained with other data fields: tokenizers.bpe_request) or the path of
  # a tokenizer.json.
  c.tokenizer = "byte"
  # Vocabulary size (specials included) when tokenizer="bpe".
  c.bpe_vocab_size = 4096
  # Share of documents (by sha1 of their path) held out for validation, in steps of
  # 0.001 rounded up (0.0001 holds out 0.1%; see corpora.split_of).
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
  # Needle-depth curriculum: the first N training batches put the queried needle at
  # depths in long_context_curriculum_depths, so a copy can form at one place before it
  # must search the whole prompt (data/long_context.py DepthCurriculum); 0 = none.
  c.long_context_curriculum_steps = 0
  c.long_context_curriculum_depths = "0,0.05"  # "low,high" fractions of the haystack.
  # "switch": that band, then [0, 1]; "widen": the band grows to [0, 1] over N batches.
  c.long_context_curriculum = "switch"
  # "widen" only: the first N of its batches hold the band before it grows (0 = none).
  c.long_context_curriculum_hold = 0
  c.seq_len = 64  # Tokens per training sequence (multiple of diffusion.block_size).
  c.batch_size = 8  # Sequences per step (global, across all devices).
  return c


def alignment_unit(config: ml_collections.ConfigDict) -> tuple[int, str] | None:
  """(tokens, field) every SFT/long-context example must start and end on, or None.

  The unit is where the objective's noisy blocks start: an example that starts mid-block
  shares its first noisy block with the example before it. BD3-LM and Fast-dLLM v2 noise
  whole ``diffusion.block_size`` blocks. I-DLM's full layout cuts the noisy stream into
  blocks of ``diffusion.isd_stride`` (``block_size`` is unused there); with anchored
  blocks (``isd_anchors`` > 0) they start at any scored position, and the AR objective
  has no blocks, so neither needs an alignment.
  """
  d = config.get("diffusion")
  if d is None:
    return None
  objective = d.get("objective", "bd3")
  if objective == "ar":
    return None
  if objective == "introspective":
    if d.get("isd_anchors", 0):
      return None
    return d.get("isd_stride", 4), "diffusion.isd_stride"
  return d.block_size, "diffusion.block_size"


def _check_int(d: ml_collections.ConfigDict, name: str, low: int, note: str = "") -> None:
  """Refuses ``data.<name>`` unless it is an int >= ``low`` (a bool is not a number)."""
  v = d[name]
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    raise ValueError(f"data.{name} must be an integer >= {low}{note}, got {v!r}")


def _check_tokenizer(config: ml_collections.ConfigDict) -> None:
  d = config.data
  _check_int(d, "bpe_vocab_size", 1)
  min_size = 256 + len(tokenizers.SPECIAL_TOKEN_NAMES)
  if d.bpe_vocab_size < min_size:
    raise ValueError(f"data.bpe_vocab_size must be >= {min_size} (256 bytes + "
                     f"{len(tokenizers.SPECIAL_TOKEN_NAMES)} specials), "
                     f"got {d.bpe_vocab_size}")
  if (config.get("init") or {}).get("pretrained"):
    return  # The pretrained model's tokenizer replaces data.tokenizer.
  name = d.tokenizer
  if not isinstance(name, str) or not name:
    raise ValueError(f"data.tokenizer must be 'byte', 'bpe' or the path of a "
                     f"tokenizer.json, got {name!r}")
  if name not in ("byte", "bpe") and not (os.path.exists(name) or name.endswith(".json")):
    raise ValueError(f"data.tokenizer={name!r} is neither 'byte', 'bpe' nor an existing "
                     "tokenizer.json path")
  if name == "bpe" and d.corpus == "sft":
    # BPE trains on corpora.load_documents, which has no SFT corpus to read.
    raise ValueError("data.tokenizer='bpe' trains on the corpus, but data.corpus='sft' "
                     "has no documents to train it on: point data.tokenizer at a "
                     "trained tokenizer.json (or use 'byte')")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``data`` field."""
  d = config.data
  # ml_collections lets a bool into an int field (True passes as 1).
  _check_int(d, "batch_size", 1)
  _check_int(d, "seq_len", 2)
  if d.corpus not in CORPORA:
    raise ValueError(f"data.corpus must be one of {CORPORA}, got {d.corpus!r}")
  _check_tokenizer(config)
  # numpy's generators refuse negative seeds, and the validation windows are only drawn
  # at the first evaluation, steps into the run.
  if isinstance(d.seed, bool) or not isinstance(d.seed, int) or d.seed < 0:
    raise ValueError(f"data.seed must be an integer >= 0, got {d.seed!r}")
  if not (isinstance(d.validation_fraction, (int, float))
          and not isinstance(d.validation_fraction, bool)
          and 0.0 <= d.validation_fraction <= 1.0):  # Also refuses NaN.
    raise ValueError(f"data.validation_fraction must be in [0, 1], "
                     f"got {d.validation_fraction}")
  # 0 means "no cap" / "all" for these.
  for name in ("max_bytes", "sft_max_examples", "long_context_min_length"):
    _check_int(d, name, 0, " (0 = no limit)")
  for name in ("long_context_num_pairs", "sft_block_multiple"):
    _check_int(d, name, 1)
  # Read by corpus=synthetic, sft_source=synthetic and --mode=eval, whatever the corpus.
  try:
    synthetic.parse_tasks(d.synthetic_tasks)
  except ValueError as e:
    raise ValueError(f"data.synthetic_tasks={d.synthetic_tasks!r}: {e}") from None
  if (isinstance(d.synthetic_digits, bool) or not isinstance(d.synthetic_digits, int)
      or not 1 <= d.synthetic_digits <= synthetic.MAX_DIGITS):
    raise ValueError(f"data.synthetic_digits must be in [1, {synthetic.MAX_DIGITS}], "
                     f"got {d.synthetic_digits}")
  if d.corpus == "sft":
    sft.source_groups(d.sft_source)  # Names the field when no source is named.
  if d.corpus == "long_context":
    for task in d.long_context_tasks.split(","):
      if task not in long_context.TASKS:
        raise ValueError(f"data.long_context_tasks: unknown task {task!r}; "
                         f"known: {long_context.TASKS}")
    _check_int(d, "long_context_curriculum_steps", 0, " (0 = no curriculum)")
    # The lower bound (the tasks' fixed parts) needs the tokenizer and is checked when
    # the data is built; this one is known now, before config.json is written.
    room = pipeline.LongContextDataset.ANSWER_ROOM
    if d.long_context_min_length > d.seq_len - room:
      raise ValueError(f"data.long_context_min_length={d.long_context_min_length} must be "
                       f"<= data.seq_len - {room} = {d.seq_len - room} (0 = half of that)")
    try:
      long_context.DepthCurriculum.parse(d.long_context_curriculum_steps,
                                         d.long_context_curriculum_depths,
                                         d.long_context_curriculum,
                                         d.long_context_curriculum_hold)
    except ValueError as e:
      raise ValueError(f"data.long_context_curriculum_depths="
                       f"{d.long_context_curriculum_depths!r}, data.long_context_curriculum="
                       f"{d.long_context_curriculum!r}, data.long_context_curriculum_hold="
                       f"{d.long_context_curriculum_hold!r}: {e}") from None
  if d.corpus in ("sft", "long_context"):
    m = d.sft_block_multiple
    if d.seq_len % m:
      what = ("(the block the answer is scored in) " if d.corpus == "long_context"
              else "")
      raise ValueError(f"data.sft_block_multiple={m} {what}must divide "
                       f"data.seq_len={d.seq_len}")
    diffusion = config.get("diffusion") or {}
    objective = diffusion.get("objective", "bd3")
    attention = diffusion.get("block_attention", "auto")
    if d.corpus == "sft" and not d.sft_score_padding and objective in ("bd3", "fastdllm") and (
        attention != "causal"):
      # Unscored padding is never masked: in the answer's last (bidirectional) block a
      # clean EOS would show where the answer stops; decoding sees that block all MASK.
      raise ValueError(f"data.sft_score_padding=False with diffusion.objective={objective!r} "
                       f"(bidirectional blocks, block_attention={attention!r}): the answer's "
                       "last block would see its clean EOS padding; set it True")
    unit = alignment_unit(config)
    if unit is not None and unit[0] >= 1 and m % unit[0]:
      raise ValueError(f"data.sft_block_multiple={m} must be a multiple of {unit[1]}="
                       f"{unit[0]}, or examples (and the answer's scored blocks) start "
                       f"or end mid-block; e.g. set it to {unit[0]}")
