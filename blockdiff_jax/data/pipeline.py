"""Batches for training and evaluation: packed LM windows and SFT rows.

Every dataset returns batches as dicts of numpy arrays:

* ``tokens`` [B, L] int32;
* ``segment_ids`` [B, L] int32: document index within the row, from 0, so
  attention can stay inside a document;
* ``loss_mask`` [B, L] float32: 1 where a position may be corrupted and
  scored, 0 where it is always given clean (BOS, prompts, separators).

Datasets are seekable: ``get_batch(index)`` is a pure function of the dataset
arguments and ``index``, and ``DatasetIterator`` saves and restores its
position as ``{"index": n}``.

Packed LM: each document becomes ``BOS doc EOS``; the documents are
concatenated in corpus order and cut into ``num_windows`` windows of
``seq_len`` (the tail is dropped). Row ``j = index * B + b`` reads window
``perm_e[j % num_windows]`` where ``e = j // num_windows`` is the epoch and
``perm_e`` a permutation seeded by ``(seed, e)``.

SFT: row ``j`` is example ``j`` laid out as ``BOS prompt SEP answer EOS...``,
padded with EOS to ``seq_len`` so the model learns to end; only the answer
and the EOS padding are scored.
"""

import abc
import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

from blockdiff_jax.data import corpora
from blockdiff_jax.data import long_context
from blockdiff_jax.data import sft
from blockdiff_jax.data import synthetic
from blockdiff_jax.data import tokenizers

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenStats:
  """Statistics for bits-per-byte (``unigram_entropy_bits / bytes_per_token`` is the
  bits-per-byte of the best context-free model)."""
  num_documents: int  # Documents (or examples) measured.
  num_bytes: int  # UTF-8 bytes of their text.
  num_tokens: int  # Their non-special tokens.
  bytes_per_token: float  # num_bytes / num_tokens.
  unigram_entropy_bits: float  # Entropy in bits/token of their token unigram distribution.

  @property
  def unigram_bits_per_byte(self) -> float:
    return self.unigram_entropy_bits / self.bytes_per_token


def token_stats(texts: Sequence[str], counts: np.ndarray) -> TokenStats:
  """``TokenStats`` of texts given the per-id counts of their tokens.

  Args:
    texts: the measured texts.
    counts: [vocab_size] counts of their non-special tokens.

  Returns:
    The statistics.
  """
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  num_tokens = int(counts.sum())
  if num_tokens == 0:
    raise ValueError(f"No tokens in {len(texts)} texts; cannot compute stats.")
  p = counts[counts > 0] / num_tokens
  entropy = float(-(p * np.log2(p)).sum())
  return TokenStats(len(texts), num_bytes, num_tokens, num_bytes / num_tokens,
                    entropy)


def _unigram_counts(ids: np.ndarray,
                    tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  counts = np.bincount(ids, minlength=tokenizer.vocab_size).astype(np.int64)
  counts[tokenizer.special_ids] = 0
  return counts


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def _check_index(index: Any) -> int:
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"Batch index must be a non-negative int, got {index!r}.")
  return int(index)


def _check_seed(seed: Any) -> int:
  # numpy's generators refuse negative seeds, but only when the first batch is drawn.
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
  return int(seed)


def _check_shape(seq_len: int, batch_size: int) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")


class Dataset(abc.ABC):
  """A seekable, infinite stream of fixed-shape batches."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, seq_len: int,
               batch_size: int):
    _check_shape(seq_len, batch_size)
    self.tokenizer = tokenizer
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)

  @abc.abstractmethod
  def get_batch(self, index: int) -> Batch:
    """Batch ``index`` (>= 0); a pure function of the dataset and index."""

  @property
  @abc.abstractmethod
  def stats(self) -> TokenStats:
    """Bits-per-byte statistics of the split."""

  @property
  def bytes_per_token(self) -> float:
    return self.stats.bytes_per_token

  @property
  def unigram_entropy_bits(self) -> float:
    return self.stats.unigram_entropy_bits

  def iterator(self, index: int = 0) -> "DatasetIterator":
    return DatasetIterator(self, index)

  def __iter__(self) -> "DatasetIterator":
    return self.iterator()


class DatasetIterator:
  """Iterates ``dataset.get_batch(0), get_batch(1), ...`` with a savable state.

  ``get_state()`` returns ``{"index": n}``, the index of the next batch; it is
  JSON-serializable and ``set_state`` resumes exactly there.
  """

  def __init__(self, dataset: Dataset, index: int = 0):
    self._dataset = dataset
    self._index = _check_index(index)

  def __iter__(self) -> "DatasetIterator":
    return self

  def __next__(self) -> Batch:
    batch = self._dataset.get_batch(self._index)
    self._index += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"index": self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or set(state) != {"index"}:
      raise ValueError(f"Iterator state must be {{'index': n}}, got {state!r}.")
    self._index = _check_index(state["index"])


class PackedLMDataset(Dataset):
  """Documents packed into ``seq_len`` windows (see module docstring)."""

  def __init__(self, documents: Sequence[str],
               tokenizer: tokenizers.Tokenizer, seq_len: int, batch_size: int,
               seed: int = 0, shuffle: bool = True):
    """Tokenizes and packs ``documents``.

    Args:
      documents: the texts of the split, in a deterministic order.
      tokenizer: the tokenizer.
      seq_len: window length L.
      batch_size: windows per batch B.
      seed: seed of the per-epoch window permutations.
      shuffle: permute windows per epoch; otherwise read them in order.

    Raises:
      ValueError: if the documents do not fill a single window.
    """
    super().__init__(tokenizer, seq_len, batch_size)
    self.seed = _check_seed(seed)
    self.shuffle = bool(shuffle)
    encoded = tokenizer.encode_batch(list(documents))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    lengths = np.array([len(t) + 2 for t in encoded], np.int64)
    ends = np.cumsum(lengths)
    # Start of each document's BOS in the stream, for segment ids.
    self._doc_starts = ends - lengths
    self._stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    for start, end, toks in zip(self._doc_starts, ends, encoded):
      self._stream[start] = bos
      self._stream[start + 1:end - 1] = toks
      self._stream[end - 1] = eos
    self._stats = token_stats(documents,
                              _unigram_counts(self._stream, tokenizer))
    self.num_windows = len(self._stream) // self.seq_len
    if self.num_windows == 0:
      raise ValueError(f"{len(documents)} documents give {len(self._stream)} "
                       f"tokens, fewer than one window of seq_len="
                       f"{self.seq_len}.")

  @property
  def stats(self) -> TokenStats:
    return self._stats

  @property
  def num_tokens(self) -> int:
    """Length of the packed BOS/doc/EOS stream, tail included."""
    return len(self._stream)

  @property
  def batches_per_epoch(self) -> int:
    """Full batches per pass over the windows (the rest spills over)."""
    return self.num_windows // self.batch_size

  def stream(self) -> np.ndarray:
    """The packed token stream as int32 (for inspection and tests)."""
    return self._stream.astype(np.int32)

  def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and segment ids of window ``w`` (in stream order)."""
    tokens, seg, _ = self._window(w)
    return tokens, seg

  def _window(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, segment ids and loss mask of window ``w``."""
    if not 0 <= w < self.num_windows:
      raise ValueError(f"Window {w} out of range [0, {self.num_windows}).")
    pos = w * self.seq_len + np.arange(self.seq_len)
    doc = np.searchsorted(self._doc_starts, pos, side="right") - 1
    # BOS is always given: it marks where a document starts. Found by position, not by
    # id: a tokenizer whose bos is its eos (SmolLM2's base <|endoftext|>) would otherwise
    # leave every document's EOS unscored, and the model would never learn to end one.
    loss_mask = (pos != self._doc_starts[doc]).astype(np.float32)
    return self._stream[pos].astype(np.int32), (doc - doc[0]).astype(np.int32), loss_mask

  def window_index(self, row: int) -> int:
    """The window read by global row ``row`` (= index * batch_size + b)."""
    epoch, pos = divmod(row, self.num_windows)
    if not self.shuffle:
      return pos
    return int(_permutation(self.seed, epoch, self.num_windows)[pos])

  def get_batch(self, index: int) -> Batch:
    index = _check_index(index)
    rows = [self._window(self.window_index(index * self.batch_size + b))
            for b in range(self.batch_size)]
    return {
        "tokens": np.stack([r[0] for r in rows]),
        "segment_ids": np.stack([r[1] for r in rows]),
        "loss_mask": np.stack([r[2] for r in rows]),
    }


class SFTDataset(Dataset):
  """Prompt/answer rows ``BOS prompt SEP answer EOS...`` (module docstring)."""

  # Examples measured for `stats` and checked to fit at construction.
  STATS_EXAMPLES = 1000
  CHECKED_EXAMPLES = 16

  def __init__(self, example_fn: Callable[[int], tuple[str, str]],
               tokenizer: tokenizers.Tokenizer, seq_len: int, batch_size: int,
               num_examples: int | None = None, seed: int = 0,
               shuffle: bool = False):
    """Creates the dataset.

    Args:
      example_fn: maps an example index to ``(prompt, answer)``; must be
        deterministic.
      tokenizer: the tokenizer.
      seq_len: row length L.
      batch_size: rows per batch B.
      num_examples: number of distinct examples; None for an infinite stream
        (row j is example j).
      seed: seed of the per-epoch permutations when ``shuffle``.
      shuffle: permute a finite set of examples per epoch.

    Raises:
      ValueError: if one of the first examples does not fit in ``seq_len``.
    """
    super().__init__(tokenizer, seq_len, batch_size)
    if num_examples is not None and num_examples < 1:
      raise ValueError(f"num_examples must be >= 1 or None, got "
                       f"{num_examples!r}.")
    self._example_fn = example_fn
    self.num_examples = num_examples
    self.seed = _check_seed(seed)
    self.shuffle = bool(shuffle)
    for j in range(min(self.CHECKED_EXAMPLES, num_examples or 1 << 62)):
      self.row(j)  # Fail at construction if examples are too long.

  def example(self, j: int) -> tuple[str, str]:
    """The raw ``(prompt, answer)`` of example ``j``, for evaluation."""
    j = _check_index(j)
    if self.num_examples is not None and j >= self.num_examples:
      raise ValueError(f"Example {j} out of range [0, {self.num_examples}).")
    return self._example_fn(j)

  def examples(self, count: int, start: int = 0) -> list[tuple[str, str]]:
    return [self.example(j) for j in range(start, start + count)]

  def prompt_tokens(self, prompt: str) -> np.ndarray:
    """``BOS prompt SEP``: what a sampler conditions on to answer ``prompt``."""
    tok = self.tokenizer
    return np.concatenate([[tok.bos_id], tok.encode(prompt),
                           [tok.sep_id]]).astype(np.int32)

  def row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss mask of example ``j``."""
    prompt, answer = self.example(j)
    head = self.prompt_tokens(prompt)
    body = self.tokenizer.encode(answer)
    pad = self.seq_len - len(head) - len(body)
    if pad < 1:  # At least one EOS, so the model sees the answer end.
      raise ValueError(f"Example {j} needs {len(head) + len(body) + 1} tokens "
                       f"(prompt {prompt[:40]!r}..., answer {len(body)} "
                       f"tokens) but seq_len={self.seq_len}.")
    tokens = np.concatenate(
        [head, body, np.full(pad, self.tokenizer.eos_id, np.int32)])
    mask = np.zeros(self.seq_len, np.float32)
    mask[len(head):] = 1.0
    return tokens.astype(np.int32), mask

  def example_index(self, row: int) -> int:
    """The example read by global row ``row`` (= index * batch_size + b)."""
    if self.num_examples is None:
      return row
    epoch, pos = divmod(row, self.num_examples)
    if not self.shuffle:
      return pos
    return int(_permutation(self.seed, epoch, self.num_examples)[pos])

  def get_batch(self, index: int) -> Batch:
    index = _check_index(index)
    rows = [self.row(self.example_index(index * self.batch_size + b))
            for b in range(self.batch_size)]
    tokens = np.stack([r[0] for r in rows])
    return {
        "tokens": tokens,
        "segment_ids": np.zeros_like(tokens),
        "loss_mask": np.stack([r[1] for r in rows]),
    }

  @functools.cached_property
  def stats(self) -> TokenStats:
    """Statistics of the answers (the scored text) of the first examples."""
    n = min(self.STATS_EXAMPLES, self.num_examples or self.STATS_EXAMPLES)
    answers = [self.example(j)[1] for j in range(n)]
    ids = np.concatenate(self.tokenizer.encode_batch(answers))
    return token_stats(answers, _unigram_counts(ids, self.tokenizer))


class SyntheticDataset(SFTDataset):
  """An infinite uniform mix of synthetic tasks (see ``synthetic``)."""

  def __init__(self, tasks: Sequence[str], tokenizer: tokenizers.Tokenizer,
               seq_len: int, batch_size: int, split: str = "train",
               seed: int = 0, digits: int = synthetic.DEFAULT_DIGITS):
    """Creates the dataset; example j is ``synthetic.mixed_example(..., j)``.

    Args:
      tasks: task names, mixed round-robin.
      tokenizer: the tokenizer.
      seq_len: row length L.
      batch_size: rows per batch B.
      split: ``"train"`` or ``"validation"`` (disjoint prompts).
      seed: base seed of the example streams.
      digits: task difficulty.
    """
    self.tasks = tuple(synthetic.validate_task(t) for t in tasks)
    if not self.tasks:
      raise ValueError("SyntheticDataset needs at least one task.")
    self.split = corpora.validate_split(split)
    self.digits = digits

    def example_fn(j):
      return synthetic.mixed_example(self.tasks, seed, j, split=split,
                                     digits=digits)[1:]

    super().__init__(example_fn, tokenizer, seq_len, batch_size, seed=seed)
    # The first examples checked by SFTDataset may all be short; a rare full-length one
    # (add with two full operands) would then stop training steps into the run.
    for task in self.tasks:
      prompt, answer = synthetic.longest_example(task, digits)
      need = len(self.prompt_tokens(prompt)) + len(tokenizer.encode(answer)) + 1
      if need > self.seq_len:
        raise ValueError(f"Synthetic task {task!r} with digits={digits} has examples of "
                         f"{need} tokens (e.g. {prompt!r} -> {answer!r}, with BOS, SEP "
                         f"and EOS) but seq_len={self.seq_len}; raise data.seq_len or "
                         f"lower data.synthetic_digits.")

  def task(self, j: int) -> str:
    """Task of example ``j``, to pass to ``synthetic.check``."""
    return self.tasks[_check_index(j) % len(self.tasks)]


class LongContextDataset(SFTDataset):
  """Passkey / key-value retrieval prompts (``data.long_context``) as SFT rows.

  Row j is ``BOS prompt SEP answer EOS...`` for ``long_context.training_example(j)``,
  built from the example's token ids (no re-encoding of its text). The answer, its EOS
  and the rest of the block the EOS falls in are masked and scored (so the decoder's
  view of the answer's block, all MASK, matches training); the prompt only with
  ``score_prompt``. Prompt lengths are uniform in ``[min_length, seq_len - ANSWER_ROOM]``
  (an example too long for its drawn length takes a longer one: ``training_example``).
  """

  ANSWER_ROOM = 24  # BOS, SEP, the answer (<= 16 tokens) and its EOS.

  def __init__(self, tasks: Sequence[str], tokenizer: tokenizers.Tokenizer, seq_len: int,
               batch_size: int, block: int, split: str = "train", seed: int = 0,
               min_length: int = 0, num_pairs: int = 4, score_prompt: bool = False,
               curriculum: long_context.DepthCurriculum = long_context.DepthCurriculum()):
    """Creates the dataset (an infinite stream).

    Args:
      tasks: ``long_context.TASKS`` names, cycled by example index.
      tokenizer: the tokenizer.
      seq_len: row length L.
      batch_size: rows per batch B.
      block: the diffusion block size (the scored span ends on a block boundary).
      split: "train" or "validation" (disjoint needle streams).
      seed: stream seed.
      min_length: shortest prompt in tokens; 0 = half the longest (at least what the
        tasks' instruction, needles and question take).
      num_pairs: key-value pairs per kv_recall prompt.
      score_prompt: also mask and score the prompt (after BOS): a language-modelling
        signal on the haystack and needles, far denser than the 5-8 answer tokens per
        row, with copies inside it (the needle repeats its key; "The pass key is"
        recurs).
    """
    self.score_prompt, self.curriculum = bool(score_prompt), curriculum
    seed = _check_seed(seed)
    self.tasks = tuple(long_context.validate_task(t) for t in tasks)
    self.split = corpora.validate_split(split)
    self.max_length = seq_len - self.ANSWER_ROOM
    shortest = max(long_context.min_prompt_length(t, tokenizer, num_pairs) for t in self.tasks)
    self.min_length = min_length or max(self.max_length // 2, shortest)
    if not shortest <= self.min_length <= self.max_length:
      raise ValueError(f"data.long_context_min_length={self.min_length} must be in "
                       f"[{shortest} (the tasks' fixed parts), seq_len - {self.ANSWER_ROOM} "
                       f"= {self.max_length}]; raise data.seq_len or lower "
                       f"data.long_context_num_pairs")
    if block < 1 or seq_len % block:
      raise ValueError(f"block={block} must be >= 1 and divide seq_len={seq_len}")
    self.block, self.num_pairs, self.stream_seed = block, num_pairs, seed
    self.haystack = long_context.load_haystack(tokenizer, 2 * seq_len)
    super().__init__(lambda j: self._text_pair(self.long_context_example(j)), tokenizer,
                     seq_len, batch_size)

  def long_context_example(self, j: int) -> long_context.LongContextExample:
    j = _check_index(j)
    train = self.split == "train"
    return long_context.training_example(
        self.tasks, self.tokenizer, self.haystack, index=j, split=self.split,
        seed=self.stream_seed, min_length=self.min_length, max_length=self.max_length,
        num_pairs=self.num_pairs,
        depth_range=self.curriculum.depth_range(j // self.batch_size) if train else (0, 1))

  @staticmethod
  def _text_pair(ex: long_context.LongContextExample) -> tuple[str, str]:
    return ex.prompt, ex.answer

  def row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    return long_context.training_row(self.long_context_example(j), self.tokenizer,
                                     self.seq_len, self.block, self.score_prompt)

  @functools.cached_property
  def stats(self) -> TokenStats:
    """Statistics of the scored text of the first examples: with ``score_prompt`` the
    prompts (mostly haystack) as well as the answers (``long_context.scored_text``)."""
    scored = [long_context.scored_text(self.long_context_example(j), self.score_prompt)
              for j in range(self.STATS_EXAMPLES)]
    return token_stats([t for t, _ in scored], _unigram_counts(
        np.concatenate([ids for _, ids in scored]).astype(np.int64), self.tokenizer))


class PackedSFTDataset(Dataset):
  """Packed, block-aligned SFT rows (see ``data.sft``); row j of epoch e is ``perm_e[j]``.

  ``dropped`` examples did not fit (``sft.pack_kept``); ``summary`` says how many, as one
  line. A split that keeps no example is refused.
  """

  def __init__(self, records: Sequence[Any], tokenizer: tokenizers.Tokenizer,
               seq_len: int, batch_size: int, multiple: int, seed: int = 0,
               shuffle: bool = True, score_padding: bool = True, split: str = "train"):
    super().__init__(tokenizer, seq_len, batch_size)
    self.seed, self.shuffle = _check_seed(seed), bool(shuffle)
    self.records, self.split = list(records), split
    self.rows, self.kept = sft.pack_kept(
        [sft.render(tokenizer, r) for r in self.records], seq_len, multiple,
        tokenizer.eos_id, score_padding, [sft.finished(r) for r in self.records])
    self.dropped = len(self.records) - len(self.kept)
    self.num_rows = len(self.rows["tokens"])
    if not self.num_rows:
      raise ValueError(f"SFT {split} split: none of its {len(self.records)} examples fits "
                       f"in data.seq_len={seq_len} (each is padded to a multiple of "
                       f"data.sft_block_multiple={multiple}); raise data.seq_len or use "
                       "shorter examples")

  @property
  def summary(self) -> str:
    """One line: the examples kept and dropped, and the rows they fill."""
    return (f"sft {self.split}: {self.dropped}/{len(self.records)} examples dropped "
            f"(longer than data.seq_len={self.seq_len}, or unfinished with no whole "
            f"block of response); {len(self.kept)} packed into {self.num_rows} rows")

  def get_batch(self, index: int) -> Batch:
    index = _check_index(index)
    idx = []
    for j in range(index * self.batch_size, (index + 1) * self.batch_size):
      epoch, pos = divmod(j, self.num_rows)
      perm = (_permutation(self.seed, epoch, self.num_rows)
              if self.shuffle else np.arange(self.num_rows))
      idx.append(int(perm[pos]))
    return {k: v[idx] for k, v in self.rows.items()}

  @functools.cached_property
  def stats(self) -> TokenStats:
    # Only what is trained on: dropped examples would skew bytes/token and the entropy.
    kept = [self.records[i] for i in self.kept[:1000]]
    answers = [r[-1]["content"] if isinstance(r, list) else r[1] for r in kept]
    ids = np.concatenate(self.tokenizer.encode_batch(answers))
    return token_stats(answers, _unigram_counts(ids, self.tokenizer))


def build_sft_dataset(data_config: Any, tokenizer: tokenizers.Tokenizer, split: str,
                      seq_len: int, batch_size: int, seed: int,
                      workdir: str | None = None) -> PackedSFTDataset:
  """The ``corpus="sft"`` dataset of ``split`` (validation rows are not shuffled)."""
  d = data_config
  records = sft.load_records(d.sft_source, split, d.validation_fraction, d.sft_max_examples,
                             d.synthetic_tasks, d.seed, d.synthetic_digits, workdir=workdir)
  ds = PackedSFTDataset(records, tokenizer, seq_len, batch_size, d.sft_block_multiple,
                        seed=seed, shuffle=split == "train",
                        score_padding=d.sft_score_padding, split=split)
  print(ds.summary, flush=True)
  return ds


def build_dataset(data_config: Any, tokenizer: tokenizers.Tokenizer,
                  split: str, seq_len: int, batch_size: int,
                  seed: int, workdir: str | None = None) -> Dataset:
  """Builds the dataset of ``split`` described by ``data_config``.

  Args:
    data_config: the ``data`` ConfigDict (see ``config.default_data_config``).
    tokenizer: from ``tokenizers.get_tokenizer``.
    split: ``"train"`` or ``"validation"``.
    seq_len: row length.
    batch_size: rows per batch.
    seed: shuffling seed of the training windows. Validation windows are
      shuffled with ``data_config.seed`` instead, so every run evaluates the
      same windows; synthetic examples always come from ``data_config.seed``.
    workdir: the run's folder (``sft_source="distilled"`` reads its ``distill/``).

  Returns:
    A ``SyntheticDataset`` for ``corpus="synthetic"``, else a
    ``PackedLMDataset``.
  """
  corpora.validate_split(split)
  if data_config.corpus == "sft":
    return build_sft_dataset(data_config, tokenizer, split, seq_len, batch_size, seed,
                             workdir)
  if data_config.corpus == "long_context":
    d = data_config
    return LongContextDataset(
        d.long_context_tasks.split(","), tokenizer, seq_len, batch_size,
        d.sft_block_multiple, split=split, seed=d.seed, min_length=d.long_context_min_length,
        num_pairs=d.long_context_num_pairs, score_prompt=d.long_context_score_prompt,
        curriculum=long_context.DepthCurriculum.parse(  # .get: for older saved configs.
            d.get("long_context_curriculum_steps", 0),
            d.get("long_context_curriculum_depths", "0,1"),
            d.get("long_context_curriculum", "switch"),
            d.get("long_context_curriculum_hold", 0)))
  if data_config.corpus == "synthetic":
    return SyntheticDataset(
        synthetic.parse_tasks(data_config.synthetic_tasks), tokenizer,
        seq_len, batch_size, split=split, seed=data_config.seed,
        digits=data_config.synthetic_digits)
  documents = corpora.load_documents(data_config, split)
  window_seed = seed if split == "train" else data_config.seed
  return PackedLMDataset(documents, tokenizer, seq_len, batch_size,
                         seed=window_seed, shuffle=True)
