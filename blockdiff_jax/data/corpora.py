"""Text corpora: the Python standard library, user files, synthetic tasks.

Default corpus (``corpus="stdlib"``): every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` of the running interpreter, skipping any
``site-packages``/``dist-packages`` folder, in sorted order of their relative
POSIX paths. It needs no download and is the same on every machine with the
same Python build (CPython 3.11: ~1.8k files, ~31 MB).

Train/validation split: a document with key ``k`` (its relative path) is in
validation iff ``int(sha1(k)) % 1000 < 1000 * validation_fraction`` (default
0.02). The split of a file therefore never changes when other files are added
or removed. The fraction acts in steps of 0.001, rounded up: 0.0015 holds out
0.2% and any fraction in (0, 0.001] holds out 0.1% (a finer rule would move
documents between the splits of existing runs).

``max_bytes > 0`` keeps, within a split and in sorted key order, documents
until their UTF-8 size reaches ``max_bytes`` (the last one may cross it), so
small runs load fast and always see the same prefix.

User files (``corpus="files"``): ``paths`` is a comma-separated list of files,
folders (searched recursively for ``.py .txt .md .jsonl .json``, skipping hidden
``.name`` folders and files as globs do) and globs.
Keys are paths relative to a listed folder, or the path as listed/matched for
files and globs. Each line of a ``.jsonl`` file is one document taken from its
``text_field``, keyed ``"<file key>:<line number>"``, so a single large JSONL
file is split by line; its split hashes the document's text, not its key, so
identical lines (of any JSONL file; whole files split by key) share a split and
inserting a line moves no other between the splits; the documents keep their file
order. Other files are read whole
as UTF-8 (a leading byte order
mark dropped, as ``read_jsonl`` drops it). An empty file or an
empty ``text_field`` holds no document: a split with none left is refused naming
``data.paths``.

Non-text user files are refused, never trained on: a file (or ``.jsonl`` line)
that is not valid UTF-8 or contains a NUL byte raises ``ValueError`` naming the
file (and line) and the offset of the first bad byte, before anything trains.
Refusing rather than skipping keeps a typo in ``paths`` (a folder holding a
checkpoint, an image, a UTF-16 file) from silently shrinking the corpus. The
stdlib corpus is exempt: four CPython test files are deliberately not UTF-8
(``test/encoded_modules/*``, ``test/test_source_encoding.py``,
``test/tokenizedata/badsyntax_pep3120.py``); they are decoded with replacement
characters as before, so the default corpus stays byte-identical.

Synthetic (``corpus="synthetic"``): ``load_documents`` returns
``"prompt\\nanswer"`` texts of the first examples of the split (enough to
train a BPE tokenizer); training itself uses ``pipeline.SyntheticDataset``.
"""

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from typing import Any, Iterable, Iterator

from blockdiff_jax.data import synthetic

CORPORA = ("stdlib", "files", "synthetic")
SPLITS = ("train", "validation")
FOLDER_EXTENSIONS = (".py", ".txt", ".md", ".jsonl", ".json")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SYNTHETIC_DOCUMENTS = 2000


@dataclasses.dataclass(frozen=True)
class Document:
  """One text document.

  Attributes:
    key: stable name (a relative path), hashed for the split; a JSONL line's
      ``"<file>:<line>"`` names it only (its text decides its split).
    text: the document text.
  """
  key: str
  text: str


def validate_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return split


def split_of(key: str, validation_fraction: float) -> str:
  """``"validation"`` or ``"train"`` for a document key (see module doc)."""
  if not 0.0 <= validation_fraction <= 1.0:
    raise ValueError("validation_fraction must be in [0, 1], got "
                     f"{validation_fraction!r}.")
  # surrogateescape: a file name that is not UTF-8 ('caf\udce9.txt' from os.walk) hashes
  # as its bytes; every other key hashes exactly as plain UTF-8 does.
  h = int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest(), 16)
  return "validation" if h % 1000 < 1000 * validation_fraction else "train"


def _read_text(path: str) -> str:
  """Stdlib files: UTF-8 with replacement (see module doc for why)."""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def _decode_strict(data: bytes, where: str, offset: int = 0,
                   field: str = "data.paths") -> str:
  """Decodes user data as UTF-8 text, or refuses it naming `where`.

  Args:
    data: raw bytes.
    where: the file (and line) to name in the error.
    offset: file offset of data[0], so the error gives a file offset.
    field: the config field that named the file, for the fix the error suggests.

  Raises:
    ValueError: if `data` is not valid UTF-8 or holds a NUL byte.
  """
  nul = data.find(b"\x00")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"{where}: not a UTF-8 text file (invalid byte 0x{data[e.start]:02x} "
        f"at byte offset {offset + e.start}); data files must be UTF-8 text: "
        f"convert it or remove it from {field}.") from None
  if nul != -1:
    raise ValueError(
        f"{where}: binary file (NUL byte at byte offset {offset + nul}); data "
        f"files must be UTF-8 text: convert it or remove it from {field}.")
  return text


def _read_user_text(path: str) -> str:
  """A user file's text, without the byte order mark Windows editors write first.

  The mark is no text: kept, it reached the model as a leading U+FEFF (and a file of
  only a mark became a document), while the same text in a .jsonl line loses it.
  """
  with open(path, "rb") as f:
    return _decode_strict(f.read(), path).removeprefix("\ufeff")


def check_unicode(text: str, where: str) -> None:
  """Refuses text with no UTF-8 form: a lone surrogate, which ``json.loads`` accepts from
  an escaped half of a pair ("\\ud83d") and which no tokenizer takes.

  Raises:
    ValueError: ``where`` holds a lone surrogate, with its code point and position.
  """
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where} holds a lone surrogate U+{ord(text[e.start]):04X} "
                     f"({text[e.start]!r}) at character {e.start} (not encodable as "
                     "UTF-8)") from None


def _take(docs: Iterable[Document], max_bytes: int) -> list[Document]:
  """Takes docs in order until their UTF-8 size reaches max_bytes (0: all)."""
  if max_bytes < 0:
    raise ValueError(f"max_bytes must be >= 0, got {max_bytes}.")
  out, total = [], 0
  for doc in docs:
    if max_bytes and total >= max_bytes:
      break
    out.append(doc)
    total += len(doc.text.encode("utf-8"))
  return out


def _walk(root: str, extensions: tuple[str, ...]) -> list[str]:
  """Relative POSIX paths of files under root with the given extensions.

  Hidden (dot) folders and files under root are skipped, as ``glob`` skips them: they
  hold tool copies and caches (``.ipynb_checkpoints/notes-checkpoint.md`` would put a
  train document's text in validation under another key, ``.mypy_cache/*.json``) and
  editor or OS debris (``.#notes.md`` lock links, macOS ``._notes.md``).
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames
                   if d not in _EXCLUDED_DIRS and not d.startswith(".")]
    for name in filenames:
      if name.endswith(extensions) and not name.startswith("."):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted relative paths of the standard library's ``.py`` files."""
  root = root or stdlib_root()
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Standard library folder {root!r} not found.")
  return _walk(root, (".py",))


def stdlib_documents(split: str, validation_fraction: float = 0.02,
                     max_bytes: int = 0,
                     root: str | None = None) -> list[Document]:
  """The standard-library corpus of ``split`` (see module docstring)."""
  validate_split(split)
  root = root or stdlib_root()
  keys = [k for k in stdlib_files(root)
          if split_of(k, validation_fraction) == split]
  # Lazily read so a max_bytes cap stops reading early.
  docs = (Document(k, _read_text(os.path.join(root, k))) for k in keys)
  return _take(docs, max_bytes)


def _expand_paths(paths: str) -> list[tuple[str, str]]:
  """(key, filesystem path) pairs for a comma-separated path list."""
  entries = [p.strip() for p in paths.split(",") if p.strip()]
  if not entries:
    raise ValueError("data.paths is empty; corpus='files' needs at least one "
                     "file, folder or glob.")
  pairs: dict[str, tuple[str, str]] = {}  # Real path -> (key, path).
  for entry in entries:
    entry = os.path.expanduser(entry)
    if os.path.isfile(entry):
      matches = [(os.path.normpath(entry), entry)]
    elif os.path.isdir(entry):
      matches = [(rel, os.path.join(entry, rel))
                 for rel in _walk(entry, FOLDER_EXTENSIONS)]
    else:
      matches = []
      for m in sorted(glob.glob(entry, recursive=True)):
        if os.path.isfile(m):
          matches.append((os.path.normpath(m), m))
        elif os.path.isdir(m):
          matches.extend((os.path.normpath(os.path.join(m, rel)),
                          os.path.join(m, rel))
                         for rel in _walk(m, FOLDER_EXTENSIONS))
    if not matches:
      raise FileNotFoundError(
          f"data.paths entry {entry!r} matches no file (folders are searched "
          f"for {FOLDER_EXTENSIONS}).")
    for key, path in matches:
      pairs.setdefault(os.path.realpath(path),
                       (key.replace(os.sep, "/"), path))
  return sorted(pairs.values())


def read_jsonl(path: str, field: str = "data.paths") -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line of a UTF-8 JSONL file.

  A byte order mark may open the file (editors on Windows write one).

  Args:
    path: the file.
    field: the config field that named it, for the fix an error suggests.

  Raises:
    ValueError: naming ``path:line`` for a line that is not UTF-8 text or not JSON.
  """
  offset = 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      where = f"{path}:{line_no}"
      line = _decode_strict(raw, where, offset, field).strip()
      offset += len(raw)
      if line_no == 1:
        line = line.removeprefix("\ufeff")
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      yield line_no, record


def _jsonl_documents(key: str, path: str,
                     text_field: str) -> Iterator[Document]:
  for line_no, record in read_jsonl(path):
    if not isinstance(record, dict) or text_field not in record:
      raise ValueError(f"{path}:{line_no}: no text field {text_field!r}.")
    text = record[text_field]
    if not isinstance(text, str):
      raise ValueError(f"{path}:{line_no}: field {text_field!r} is "
                       f"{type(text).__name__}, not a string.")
    check_unicode(text, f"{path}:{line_no}: field {text_field!r}")
    if text:  # An empty text holds no document, as an empty file holds none.
      yield Document(f"{key}:{line_no}", text)


def file_documents(paths: str, split: str, validation_fraction: float = 0.02,
                   max_bytes: int = 0,
                   text_field: str = "text") -> list[Document]:
  """User documents of ``split`` from files, folders and globs."""
  validate_split(split)
  docs = []
  for key, path in _expand_paths(paths):
    if path.endswith(".jsonl"):
      # By text: a line-number key put copies of a text in both splits (validation
      # scored text trained on), and an inserted line moved every later one.
      docs.extend(d for d in _jsonl_documents(key, path, text_field)
                  if split_of(d.text, validation_fraction) == split)
    else:
      # Read (and so checked) whatever its split: a bad file is refused the
      # same way whichever split is loaded first.
      text = _read_user_text(path)
      # An empty file holds no document (it would reach the statistics as zero tokens).
      if text and split_of(key, validation_fraction) == split:
        docs.append(Document(key, text))
  # Already in order: files by key, a JSONL file's lines by number (sorting the keys as
  # text would put "f.jsonl:10" before "f.jsonl:2" and max_bytes would take line 10).
  return _take(docs, max_bytes)


def synthetic_documents(tasks: str, split: str, seed: int = 0,
                        digits: int = synthetic.DEFAULT_DIGITS,
                        max_bytes: int = 0) -> list[Document]:
  """``"prompt\\nanswer"`` texts of the first synthetic examples of a split."""
  validate_split(split)
  task_list = synthetic.parse_tasks(tasks)

  def gen():
    for i in range(_SYNTHETIC_DOCUMENTS):
      _, prompt, answer = synthetic.mixed_example(
          task_list, seed, i, split=split, digits=digits)
      yield Document(f"{split}:{i}", f"{prompt}\n{answer}")

  return _take(gen(), max_bytes)


def load_documents(data_config: Any, split: str) -> list[str]:
  """Document texts of ``split`` for the corpus named by ``data_config``.

  Args:
    data_config: the ``data`` ConfigDict (see ``config.default_data_config``).
    split: ``"train"`` or ``"validation"``.

  Returns:
    The texts, in deterministic order.

  Raises:
    ValueError: for an unknown corpus or split, or an empty result.
    FileNotFoundError: if a ``paths`` entry matches nothing.
  """
  validate_split(split)
  corpus = data_config.corpus
  fraction = data_config.validation_fraction
  max_bytes = data_config.max_bytes
  if corpus in ("stdlib", "long_context"):  # long_context: its haystack's library.
    docs = stdlib_documents(split, fraction, max_bytes)
  elif corpus == "files":
    docs = file_documents(data_config.paths, split, fraction, max_bytes,
                          data_config.text_field)
  elif corpus == "synthetic":
    docs = synthetic_documents(data_config.synthetic_tasks, split,
                               data_config.seed, data_config.synthetic_digits,
                               max_bytes)
  else:
    raise ValueError(f"Unknown corpus {corpus!r}; expected one of {CORPORA}.")
  if not docs:
    source = f", data.paths={data_config.paths!r}" if corpus == "files" else ""
    raise ValueError(f"Split {split!r} of corpus {corpus!r} is empty "
                     f"(validation_fraction={fraction}{source}); add documents or "
                     "change validation_fraction.")
  return [d.text for d in docs]
