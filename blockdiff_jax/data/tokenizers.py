"""Tokenizers: a byte-level default and a locally trained byte-level BPE.

Every tokenizer exposes the same eight special tokens, named ``<|pad|>``,
``<|bos|>``, ``<|eos|>``, ``<|mask|>`` (the diffusion absorbing state),
``<|fim_prefix|>``, ``<|fim_middle|>``, ``<|fim_suffix|>`` (fill-in-the-middle)
and ``<|sep|>`` (prompt/answer separator). ``encode`` never emits them: text
that happens to spell ``<|eos|>`` is encoded as ordinary bytes, so a corpus
cannot inject control tokens. Specials are added explicitly by the data
pipeline.
"""

import abc
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence
import uuid

import numpy as np
import tokenizers as hf_tokenizers

from blockdiff_jax.data import corpora

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
MASK = "<|mask|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
SEP = "<|sep|>"

# Order matters: ByteTokenizer assigns ids 256.. in this order and BPE training
# puts them first in the vocabulary in this order.
SPECIAL_TOKEN_NAMES = (PAD, BOS, EOS, MASK, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX,
                       SEP)

TOKENIZER_FILENAME = "tokenizer.json"
# Beside a workdir's trained tokenizer.json: the data fields it was trained with.
TOKENIZER_REQUEST_FILENAME = "tokenizer_request.json"


class Tokenizer(abc.ABC):
  """Interface shared by all tokenizers of the data layer."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids, specials included; all ids are < vocab_size."""

  @property
  @abc.abstractmethod
  def special_tokens(self) -> dict[str, int]:
    """Maps each name in ``SPECIAL_TOKEN_NAMES`` (and maybe more) to its id."""

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Encodes text to an int32 array of ids; never adds special tokens."""

  @abc.abstractmethod
  def decode(self, ids: Any, skip_special: bool = True) -> str:
    """Decodes ids to text.

    Args:
      ids: a sequence or 1-D array of token ids.
      skip_special: drop special tokens; otherwise render them by name.

    Returns:
      The decoded text; invalid UTF-8 is replaced by U+FFFD.
    """

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes several texts; subclasses may parallelize."""
    return [self.encode(t) for t in check_texts(texts)]

  def token_id(self, name: str) -> int:
    """Returns the id of a special token, e.g. ``"<|eos|>"`` or ``"eos"``.

    Raises:
      KeyError: if ``name`` is not a special token of this tokenizer.
    """
    specials = self.special_tokens
    if name in specials:
      return specials[name]
    full = f"<|{name}|>"
    if full in specials:
      return specials[full]
    raise KeyError(f"Unknown special token {name!r}; known special tokens: "
                   f"{sorted(specials)}")

  @property
  def special_ids(self) -> np.ndarray:
    """Sorted int32 array of all special token ids."""
    return np.array(sorted(set(self.special_tokens.values())), np.int32)

  def is_special(self, ids: Any) -> Any:
    """True where ``ids`` is a special token id (works on ints and arrays)."""
    result = np.isin(ids, self.special_ids)
    return bool(result) if np.ndim(ids) == 0 else result

  @property
  def pad_id(self) -> int:
    return self.token_id(PAD)

  @property
  def bos_id(self) -> int:
    return self.token_id(BOS)

  @property
  def eos_id(self) -> int:
    return self.token_id(EOS)

  @property
  def mask_id(self) -> int:
    return self.token_id(MASK)

  @property
  def fim_prefix_id(self) -> int:
    return self.token_id(FIM_PREFIX)

  @property
  def fim_middle_id(self) -> int:
    return self.token_id(FIM_MIDDLE)

  @property
  def fim_suffix_id(self) -> int:
    return self.token_id(FIM_SUFFIX)

  @property
  def sep_id(self) -> int:
    return self.token_id(SEP)


def library_vocab_size(tokenizer: hf_tokenizers.Tokenizer, cache: dict) -> int:
  """One past the largest id of a ``tokenizers.Tokenizer``: the ``vocab_size`` it needs.

  The library's ``get_vocab_size`` counts tokens, which is less when the ids skip values
  (a tokenizer.json with holes); the model built with that size would get ids past its
  embedding (a gather JAX clamps without an error). The largest id is looked up once per
  token count (copying a 150k vocabulary takes a fraction of a second).

  Args:
    tokenizer: the library tokenizer.
    cache: the caller's dict, kept between calls.
  """
  count = tokenizer.get_vocab_size(with_added_tokens=True)
  if cache.get("count") != count:
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    cache["count"], cache["size"] = count, max(count, max(ids, default=-1) + 1)
  return cache["size"]


def check_texts(texts: Any) -> list[str]:
  """``texts`` as a list of str, or a TypeError naming what is not one.

  The library reads a str as a sequence of one-character texts and a (str, str) pair as
  a pair to encode together, so a wrong argument would encode without an error.
  """
  if isinstance(texts, (str, bytes)):
    raise TypeError(f"encode_batch expects a sequence of str, got {type(texts).__name__}; "
                    "use encode for one text.")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"encode_batch: texts[{i}] is {type(t).__name__}, not str.")
  return texts


def unencodable_error(text: str, where: str = "text") -> ValueError | None:
  """A ValueError naming the lone surrogate of ``text`` (no UTF-8 form), else None.

  ``json.loads`` accepts an escaped ``"\\ud83d"`` (half an emoji), and the library
  then fails with ``TypeError: TextInputSequence must be str``.
  """
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    return ValueError(f"{where} holds the lone surrogate {text[e.start]!r} at character "
                      f"{e.start}; it has no UTF-8 form to encode.")
  return None


def library_encode(tokenizer: hf_tokenizers.Tokenizer, text: str) -> list[int]:
  """``tokenizer.encode(text)`` ids without added specials; ValueError on a lone surrogate."""
  if not isinstance(text, str):
    raise TypeError(f"encode expects str, got {type(text).__name__}.")
  try:
    return tokenizer.encode(text, add_special_tokens=False).ids
  except TypeError:
    error = unencodable_error(text)
    if error is None:
      raise
    raise error from None


def library_encode_batch(tokenizer: hf_tokenizers.Tokenizer,
                         texts: Any) -> list[np.ndarray]:
  """``encode_batch`` of ``tokenizer`` as int32 arrays; errors name the text at fault."""
  texts = check_texts(texts)
  try:
    encs = tokenizer.encode_batch(texts, add_special_tokens=False)
  except TypeError:
    for i, t in enumerate(texts):
      error = unencodable_error(t, f"texts[{i}]")
      if error is not None:
        raise error from None
    raise
  return [np.asarray(e.ids, np.int32) for e in encs]


def checked_ids(ids: Any, vocab_size: int) -> np.ndarray:
  """``ids`` as a 1-D int64 array, or a ValueError naming what is wrong with them.

  The range is checked before the cast: a uint64 id of 2**63 or more cast first became
  a negative id in the message, and a Python int past 64 bits (an object array) was
  reported as a wrong dtype rather than as the id out of range it is.

  Args:
    ids: a sequence or 1-D array of token ids.
    vocab_size: every id must be in ``[0, vocab_size)``.

  Raises:
    ValueError: not 1-D, not integers, or an id out of range.
  """
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"Expected a 1-D sequence of ids, got shape {arr.shape}.")
  if not arr.size:
    return arr.astype(np.int64)
  values = arr.tolist() if arr.dtype == object else None
  if values is not None and all(isinstance(i, int) and not isinstance(i, bool) for i in values):
    # Ints numpy cannot hold in one integer dtype (past 64 bits): one is out of range.
    bad = [i for i in values if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"Token id {bad[0]} out of range [0, {vocab_size}).")
    arr = np.asarray(values, np.int64)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"Expected integer token ids, got dtype {arr.dtype}.")
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    raise ValueError(f"Token id {int(arr[bad][0])} out of range [0, {vocab_size}).")
  return arr.astype(np.int64)


class ByteTokenizer(Tokenizer):
  """Ids 0..255 are raw UTF-8 bytes; the eight specials follow (256..263)."""

  _SPECIALS = {name: 256 + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}

  @property
  def vocab_size(self) -> int:
    return 256 + len(SPECIAL_TOKEN_NAMES)

  @property
  def special_tokens(self) -> dict[str, int]:
    return dict(self._SPECIALS)

  def encode(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}.")
    try:
      data = text.encode("utf-8")
    except UnicodeEncodeError:
      raise unencodable_error(text) from None
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids: Any, skip_special: bool = True) -> str:
    arr = checked_ids(ids, self.vocab_size)
    names = {v: k for k, v in self._SPECIALS.items()}
    # Decode runs of bytes together so multi-byte characters survive.
    pieces, run = [], []
    for i in arr.tolist():
      if i < 256:
        run.append(i)
        continue
      if skip_special:  # Dropped specials keep the bytes around them one run, as the
        continue  # library tokenizers do: a character split by one is not two U+FFFD.
      pieces.append(bytes(run).decode("utf-8", errors="replace"))
      run = []
      pieces.append(names[i])
    pieces.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(pieces)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class BPETokenizer(Tokenizer):
  """Wraps a Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE)."""

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer, source: str = ""):
    """Wraps ``tokenizer``, adding any missing special token (see from_file).

    Args:
      tokenizer: the library tokenizer; it is modified in place.
      source: where it came from, for messages.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [n for n in SPECIAL_TOKEN_NAMES if n not in vocab]
    if missing:
      logging.warning("Tokenizer %s lacks %s; adding them as new tokens.",
                      source or "<in-memory>", missing)
      tokenizer.add_special_tokens(missing)
      # The library numbers new tokens from the vocabulary's entry count, so
      # a file with holes in its ids would get an id that is already taken.
      used = set(vocab.values())
      for name in missing:
        if tokenizer.token_to_id(name) in used:
          raise ValueError(
              f"Cannot add {name!r} to tokenizer {source or '<in-memory>'}: "
              f"id {tokenizer.token_to_id(name)} is taken (non-contiguous "
              "ids); add the special tokens to the file instead.")
    # A required name the file holds as a plain token (an added token with
    # "special": false, e.g. made with add_tokens, or a vocabulary entry) is
    # re-registered as special under the same id: the library matches a
    # non-special added token whole in text whatever encode_special_tokens
    # says (so "<|eos|>" in a document became the EOS id) and keeps it in
    # decode(skip_special_tokens=True).
    flagged = {a.content for a in tokenizer.get_added_tokens_decoder().values()
               if a.special}
    plain = [n for n in SPECIAL_TOKEN_NAMES if n in vocab and n not in flagged]
    if plain:
      tokenizer.add_special_tokens([
          hf_tokenizers.AddedToken(n, special=True, normalized=False) for n in plain])
    # Not stored in tokenizer.json; without it literal "<|eos|>" text in a
    # document would become the EOS id.
    tokenizer.encode_special_tokens = True
    self._tok = tokenizer
    self._source = source
    self._size_cache = {}
    self._specials = {}
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
      if added.special:
        self._specials[added.content] = int(token_id)
    for name in SPECIAL_TOKEN_NAMES:  # Also when present but not flagged.
      self._specials[name] = int(tokenizer.token_to_id(name))

  @classmethod
  def from_file(cls, path: str) -> "BPETokenizer":
    """Loads a ``tokenizer.json``.

    Any of the eight required special tokens that the file lacks is appended
    to the vocabulary as a new special token (the library allows adding
    tokens after training), so ``vocab_size`` may grow; a model trained with
    the original file then needs a larger embedding table.

    Args:
      path: the ``tokenizer.json`` file, or a folder holding one.

    Returns:
      The loaded tokenizer.

    Raises:
      FileNotFoundError: if there is no such file.
      ValueError: if the file cannot be parsed as a tokenizer.
    """
    if os.path.isdir(path):
      path = os.path.join(path, TOKENIZER_FILENAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No tokenizer file at {path!r}.")
    try:
      tok = hf_tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises a bare Exception.
      raise ValueError(f"Cannot load tokenizer from {path!r}: {e}") from e
    return cls(tok, source=path)

  def save(self, path: str) -> None:
    """Writes the tokenizer as JSON to ``path`` (parent folders created)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self._tok.save(path)

  @property
  def hf_tokenizer(self) -> hf_tokenizers.Tokenizer:
    return self._tok

  @property
  def vocab_size(self) -> int:
    return library_vocab_size(self._tok, self._size_cache)

  @property
  def special_tokens(self) -> dict[str, int]:
    return dict(self._specials)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(library_encode(self._tok, text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return library_encode_batch(self._tok, texts)

  def decode(self, ids: Any, skip_special: bool = True) -> str:
    arr = checked_ids(ids, self.vocab_size)
    return self._tok.decode(arr.tolist(), skip_special_tokens=skip_special)

  def __repr__(self) -> str:
    return (f"BPETokenizer(vocab_size={self.vocab_size}, "
            f"source={self._source!r})")


def write_atomically(path: str, write: Callable[[str], Any]) -> None:
  """``write(tmp)`` to a new file beside ``path``, then renamed onto ``path``.

  A process killed mid-write leaves no truncated ``path`` (the next run retrains
  instead of failing to read it), and a reader on another host sees the old file or
  the whole new one, never a half-written one. ``os.replace`` is atomic within a
  folder; the name is unique per call, so hosts writing the same file never share it.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def train_bpe(texts: Iterable[str], vocab_size: int,
              path: str | None = None) -> BPETokenizer:
  """Trains a byte-level BPE tokenizer locally with the ``tokenizers`` library.

  The eight special tokens take ids 0..7; all 256 byte symbols are in the
  initial alphabet, so any text round-trips exactly.

  Args:
    texts: training documents.
    vocab_size: target vocabulary size including specials; the result may be
      smaller when the corpus runs out of merges.
    path: if given, the ``tokenizer.json`` file to write.

  Returns:
    The trained tokenizer.

  Raises:
    ValueError: if ``vocab_size`` cannot hold the byte alphabet and specials.
    TypeError: if ``texts`` is one str, or a document is not a str.
  """
  if isinstance(texts, (str, bytes)):
    # Iterated, one str is a corpus of one-character documents: no merge is learned.
    raise TypeError(f"train_bpe expects an iterable of str documents, got one "
                    f"{type(texts).__name__}.")

  def documents():  # Lazily, as given; the library's own error names no document.
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"train_bpe: document {i} is {type(t).__name__}, not str.")
      yield t

  min_size = 256 + len(SPECIAL_TOKEN_NAMES)
  if vocab_size < min_size:
    raise ValueError(f"bpe vocab_size={vocab_size} is below the minimum "
                     f"{min_size} (256 bytes + {len(SPECIAL_TOKEN_NAMES)} "
                     "specials).")
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKEN_NAMES),
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(documents(), trainer=trainer)
  result = BPETokenizer(tok, source=path or "")
  if path:
    write_atomically(path, result.save)
  return result


def bpe_request(data_config: Any) -> dict[str, Any]:
  """The ``data`` fields that decide what ``tokenizer="bpe"`` trains.

  The vocabulary size and the fields ``corpora.load_documents`` reads for the train
  split of the corpus (long_context reads the stdlib corpus).
  """
  d = data_config
  corpus = "stdlib" if d.corpus == "long_context" else d.corpus
  fields = ["bpe_vocab_size", "validation_fraction", "max_bytes"]
  if corpus == "files":
    fields += ["paths", "text_field"]
  elif corpus == "synthetic":
    fields += ["synthetic_tasks", "seed", "synthetic_digits"]
  request = {"corpus": corpus, **{f: d[f] for f in fields}}
  return json.loads(json.dumps(request))  # As read back from the file.


def _check_reuse(path: str, request: dict[str, Any], vocab_size: int,
                 strict: bool = True) -> None:
  """Refuses a workdir tokenizer trained with other ``data`` fields than ``request``.

  Retraining instead would replace the tokenizer that the workdir's checkpoints were
  trained with. A file from before requests were recorded has no record: it is reused,
  unless its vocabulary is larger than asked for (it cannot come from this request).
  Not ``strict`` (evaluating, sampling or serving a trained run), the file is the run's
  tokenizer whatever the config now says of its data: a difference is only logged.
  """
  record = os.path.join(os.path.dirname(path), TOKENIZER_REQUEST_FILENAME)
  if not os.path.isfile(record):
    want = request["bpe_vocab_size"]
    if vocab_size > want and strict:
      raise ValueError(
          f"{path} has {vocab_size} tokens but data.bpe_vocab_size={want}: it was "
          f"trained with another size. Set data.bpe_vocab_size={vocab_size} to reuse "
          "it, or use a new workdir to train a new one")
    if vocab_size < want:
      logging.warning("Reusing %s (%d tokens, no record of its training request) for "
                      "data.bpe_vocab_size=%d.", path, vocab_size, want)
    return
  try:
    with open(record, encoding="utf-8") as f:
      got = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"Cannot read {record}: {e}") from None
  if not isinstance(got, dict):  # got.get below would raise AttributeError.
    raise ValueError(f"Cannot read {record}: it holds a JSON {type(got).__name__}, not "
                     "the object of data fields the tokenizer was trained with.")
  diff = [f"data.{k}={got.get(k)!r} (config: {v!r})" for k, v in request.items()
          if got.get(k) != v]
  if diff and not strict:
    logging.warning("Using %s, the run's tokenizer, trained with %s.", path, ", ".join(diff))
  elif diff:
    raise ValueError(
        f"{path} was trained with {', '.join(diff)}. Set those fields back to reuse it "
        "(the checkpoints of this workdir use it), point data.tokenizer at the file to "
        f"use it as is, or use a new workdir (or delete it and {record}) to train a "
        "new one")


def get_tokenizer(data_config: Any, workdir: str | None = None,
                  strict: bool = True) -> Tokenizer:
  """Builds the tokenizer named by ``data_config.tokenizer``.

  Args:
    data_config: the ``data`` ConfigDict. ``tokenizer`` is ``"byte"``,
      ``"bpe"`` (trained on the training split with ``bpe_vocab_size`` and
      saved to ``workdir/tokenizer.json``, or reused from there if that file
      exists and was trained with the same ``bpe_request`` fields) or the path of a
      ``tokenizer.json``.
    workdir: run folder; without it a ``"bpe"`` tokenizer is trained but not
      saved.
    strict: refuse a workdir tokenizer trained with other ``data`` fields (training);
      False reuses it with a warning (inference on a trained run: it is the run's).

  Returns:
    The tokenizer.

  Raises:
    ValueError: if ``data_config.tokenizer`` is empty or names no file, or the
      workdir's tokenizer was trained with other ``data`` fields.
  """
  name = data_config.tokenizer
  if not name:
    raise ValueError("data.tokenizer is empty; use 'byte', 'bpe' or a path.")
  if name == "byte":
    return ByteTokenizer()
  if name == "bpe":
    path = os.path.join(workdir, TOKENIZER_FILENAME) if workdir else None
    request = bpe_request(data_config)
    if path and os.path.isfile(path):
      logging.info("Reusing BPE tokenizer %s.", path)
      tok = BPETokenizer.from_file(path)
      _check_reuse(path, request, tok.vocab_size, strict)
      return tok
    texts = corpora.load_documents(data_config, "train")
    logging.info("Training BPE (vocab %d) on %d documents.",
                 data_config.bpe_vocab_size, len(texts))
    if path:
      # The record first: a crash before the tokenizer is written only retrains.
      def write_request(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
          json.dump(request, f, indent=1, sort_keys=True)
      write_atomically(os.path.join(workdir, TOKENIZER_REQUEST_FILENAME), write_request)
    return train_bpe(texts, data_config.bpe_vocab_size, path)
  if os.path.exists(name):
    return BPETokenizer.from_file(name)
  raise ValueError(f"data.tokenizer={name!r} is neither 'byte', 'bpe' nor an "
                   "existing tokenizer.json path.")
