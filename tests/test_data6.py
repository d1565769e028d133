"""Hardening of data/{sft,corpora,synthetic,config}.py: file walks, split keys, sources."""

import hashlib
import os

import ml_collections
import pytest

from blockdiff_jax.data import config as data_config
from blockdiff_jax.data import corpora
from blockdiff_jax.data import sft
from blockdiff_jax.data import synthetic


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def test_a_repeated_synthetic_task_is_refused_naming_it_and_the_field():
  # mixed_example gives tasks[i % n] its example i // n: "sort,sort" handed out every
  # sort example twice in a row instead of weighting sort up.
  with pytest.raises(ValueError, match=r"'sort' named more than once in 'sort, add,sort'"):
    synthetic.parse_tasks("sort, add,sort")
  c = ml_collections.ConfigDict({"data": data_config.default_data_config()})
  c.data.synthetic_tasks = "add,add"
  with pytest.raises(ValueError, match=r"data\.synthetic_tasks='add,add'.*'add'"):
    data_config.validate(c)
  tasks = synthetic.parse_tasks(" sort ,add,copy_edit")
  assert tasks == ("sort", "add", "copy_edit")
  prompts = [synthetic.mixed_example(tasks, 0, i)[1] for i in range(30)]
  assert len(set(prompts)) == len(prompts)


def test_docstring_module_names_come_from_posix_paths_whatever_os_sep(tmp_path,
                                                                      monkeypatch):
  # stdlib_files returns POSIX paths on every OS; splitting them on os.sep named the
  # module "email/mime/text" on Windows.
  _write(tmp_path / "pkg" / "sub" / "mod.py",
         'def fetch(url, retries=3):\n  """Fetches the resource at url, retrying on errors."""\n')
  _write(tmp_path / "pkg" / "__init__.py",
         'class Box:\n  """A box that holds exactly one value at a time."""\n')
  monkeypatch.setattr(os, "sep", "\\")
  pairs = list(sft.docstring_pairs(str(tmp_path)))
  assert pairs == [
      ("What does the Python standard library class `pkg.Box` do?",
       "A box that holds exactly one value at a time."),
      ("What does the Python standard library function "
       "`pkg.sub.mod.fetch(url, retries=3)` do?",
       "Fetches the resource at url, retrying on errors."),
  ]


def test_folder_walks_skip_hidden_folders_and_files_as_globs_do(tmp_path):
  root = tmp_path / "notes"
  _write(root / "notes.md", "the text of the notes\n")
  _write(root / "sub" / "b.txt", "more text\n")
  # A JupyterLab checkpoint holds the same text under another key: it could land in the
  # other split. A tool cache is no training text.
  _write(root / ".ipynb_checkpoints" / "notes-checkpoint.md", "the text of the notes\n")
  _write(root / ".mypy_cache" / "3.11" / "notes.data.json", '{"cache": 1}')
  _write(root / "sub" / "._b.txt", "macOS resource fork\n")
  # An emacs lock file is a dangling link named like a document: reading it crashed.
  os.symlink("user@host.4242:1700000000", root / ".#notes.md")
  want = ["notes.md", "sub/b.txt"]
  for fraction in (0.0, 0.5, 1.0):
    keys = sorted(d.key for s in corpora.SPLITS
                  for d in corpora.file_documents(str(root), s, fraction))
    assert keys == want
  # Globs skip hidden names the same way, so a folder and its glob agree.
  matched = sorted(d.key for s in corpora.SPLITS
                   for d in corpora.file_documents(f"{root}/**", s, 0.5))
  assert matched == sorted(os.path.join(str(root), k) for k in want)
  # A hidden file listed by name is still read: only walks skip it.
  listed = corpora.file_documents(str(root / ".ipynb_checkpoints" / "notes-checkpoint.md"),
                                  "train", 0.0)
  assert [d.text for d in listed] == ["the text of the notes\n"]


def test_a_file_name_that_is_not_utf8_is_split_by_its_bytes(tmp_path):
  raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt")
  try:
    with open(raw, "wb") as f:
      f.write(b"menu of the day\n")
  except OSError:
    pytest.skip("this file system refuses non-UTF-8 file names")
  _write(tmp_path / "plain.txt", "plain text\n")
  # os.walk names it 'caf\udce9.txt'; hashing that as UTF-8 raised UnicodeEncodeError.
  docs = {s: corpora.file_documents(str(tmp_path), s, 0.5) for s in corpora.SPLITS}
  by_key = {d.key: (s, d.text) for s, ds in docs.items() for d in ds}
  assert set(by_key) == {"caf\udce9.txt", "plain.txt"}
  for key, data in (("caf\udce9.txt", b"caf\xe9.txt"), ("plain.txt", b"plain.txt")):
    h = int(hashlib.sha1(data).hexdigest(), 16)
    assert by_key[key][0] == ("validation" if h % 1000 < 500 else "train")
  assert by_key["caf\udce9.txt"][1] == "menu of the day\n"


def test_a_jsonl_file_listed_twice_is_refused(tmp_path):
  path = _write(tmp_path / "a.jsonl",
                "".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(3)))
  assert sft.load_records(str(path), "train", 0.0, 0) == [(f"q{i}", f"a{i}")
                                                         for i in range(3)]
  other = os.path.join(str(tmp_path), "..", tmp_path.name, "a.jsonl")
  for source in (f"{path},{other}", f"{path}, {path}"):
    with pytest.raises(ValueError, match=r"data\.sft_source lists the JSONL file .*a\.jsonl"
                       r"' twice"):
      sft.load_records(source, "train", 0.0, 0)


def test_empty_jsonl_texts_hold_no_document_like_empty_files(tmp_path):
  path = _write(tmp_path / "a.jsonl", '{"text": "one"}\n{"text": ""}\n{"text": "three"}\n')
  docs = corpora.file_documents(str(path), "train", 0.0)
  # The other lines keep their keys (so their splits): only the empty one is gone.
  assert [(d.key, d.text) for d in docs] == [(f"{path}:1", "one"), (f"{path}:3", "three")]
  # All empty: the split is refused naming data.paths, as for empty files; it used to
  # reach the packer and fail as "No tokens in 2 texts; cannot compute stats".
  empty = _write(tmp_path / "e.jsonl", '{"text": ""}\n\n{"text": ""}\n')
  d = data_config.default_data_config()
  d.corpus, d.paths, d.validation_fraction = "files", str(empty), 0.0
  with pytest.raises(ValueError, match=r"Split 'train' of corpus 'files' is empty.*"
                     r"data\.paths='.*e\.jsonl'"):
    corpora.load_documents(d, "train")
