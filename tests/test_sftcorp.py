"""Hardening of data/sft.py, data/corpora.py and data/synthetic.py (session 16)."""

import os

import numpy as np
import pytest

from blockdiff_jax.data import corpora
from blockdiff_jax.data import sft
from blockdiff_jax.data import synthetic


# --- synthetic.py ---------------------------------------------------------------------

@pytest.mark.parametrize("task,prompt", [
    ("add", "add: \u0663+1"),                         # ARABIC-INDIC DIGIT THREE.
    ("add", "add: 12+\uff14"),                        # FULLWIDTH DIGIT FOUR.
    ("sort", "sort: \u0663 1"),
    ("copy_edit", "copy_edit: abc; set \u0661 to z"),  # ARABIC-INDIC DIGIT ONE.
])
def test_solve_refuses_non_ascii_digits(task, prompt):
  """\\d matched any script's digits: int() then solved prompts no generator writes."""
  with pytest.raises(ValueError, match="not a valid"):
    synthetic.solve(task, prompt)
  with pytest.raises(ValueError, match="not a valid"):
    synthetic.check(task, prompt, "4")


def test_ascii_patterns_still_solve_generated_prompts_right():
  """Prompts with other scripts' digits are refused; every generated one is still
  solved, and agrees with an independent computation."""
  with pytest.raises(ValueError, match="not a valid"):
    synthetic.solve("add", "add: \u0664\u0665+1")
  for j in range(30):
    task, prompt, answer = synthetic.mixed_example(synthetic.TASKS, 3, j, digits=4)
    body = prompt.split(": ", 1)[1]
    if task == "sort":
      want = " ".join(sorted(body.split(), key=int))
    elif task == "add":
      a, b = body.split("+")
      want = str(int(a) + int(b))
    else:
      text, edit = body.split("; set ")
      pos, new = edit.split(" to ")
      want = "".join(new if i == int(pos) else c for i, c in enumerate(text))
    assert answer == want == synthetic.solve(task, prompt)


@pytest.mark.parametrize("task", synthetic.TASKS)
@pytest.mark.parametrize("digits", [0, -2, synthetic.MAX_DIGITS + 1, True])
def test_longest_example_refuses_bad_digits(task, digits):
  """digits=0 failed as "Prompt 'add: +' is not a valid prompt"; 65 passed silently."""
  with pytest.raises(ValueError, match=r"digits must be an int in \[1, 64\]"):
    synthetic.longest_example(task, digits)


def test_make_example_refuses_bool_digits():
  with pytest.raises(ValueError, match="digits must be an int"):
    synthetic.make_example("add", 0, 0, digits=True)


# --- sft.py ---------------------------------------------------------------------------

def test_first_paragraph_ends_at_a_blank_line_holding_spaces(tmp_path):
  """cleandoc keeps the spaces of a blank line indented deeper than the docstring."""
  src = ('def frob(x):\n'
         '    """Frobnicate x into a well-formed widget.\n'
         '        \n'
         '    Second paragraph, never part of the answer.\n'
         '    """\n')
  (tmp_path / "mymod.py").write_text(src)
  pairs = list(sft.docstring_pairs(str(tmp_path)))
  assert pairs == [("What does the Python standard library function `mymod.frob(x)` do?",
                    "Frobnicate x into a well-formed widget.")]


@pytest.mark.parametrize("seq_len,multiple", [(32, 0), (32, -4), (-32, 4), (32, 4.0),
                                              (32, True)])
def test_pack_refuses_non_positive_sizes(seq_len, multiple):
  """multiple=0 raised ZeroDivisionError; -4 asked numpy for negative padding."""
  ex = [(np.array([1, 2], np.int32), np.array([3, 4, 5], np.int32))]
  with pytest.raises(ValueError, match="must be a positive int"):
    sft.pack_kept(ex, seq_len, multiple, eos_id=0)


def test_distilled_files_skip_hidden_debris(tmp_path):
  """An emacs lock link (.#answers.jsonl, dangling) failed the whole SFT run."""
  folder = tmp_path / "distill"
  folder.mkdir()
  (folder / "answers.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
  os.symlink("user@host.1234:1700000000", folder / ".#answers.jsonl")
  (folder / "._answers.jsonl").write_bytes(b"\x00\x05\x16\x07\x00\x02")  # AppleDouble.
  assert sft.distilled_files(str(tmp_path)) == str(folder / "answers.jsonl")
  assert sft.jsonl_records(sft.distilled_files(str(tmp_path))) == [("p", "r")]


# --- corpora.py -----------------------------------------------------------------------

def test_plain_file_drops_byte_order_mark(tmp_path):
  """A .txt saved with a BOM trained on U+FEFF; its .jsonl twin lost the mark."""
  (tmp_path / "a.txt").write_bytes("\ufeffhello world\n".encode("utf-8"))
  (tmp_path / "b.jsonl").write_bytes('\ufeff{"text": "hello world\\n"}\n'.encode("utf-8"))
  (tmp_path / "only_bom.md").write_bytes("\ufeff".encode("utf-8"))
  docs = corpora.file_documents(str(tmp_path), "train", validation_fraction=0.0)
  assert [(d.key, d.text) for d in docs] == [("a.txt", "hello world\n"),
                                             ("b.jsonl:1", "hello world\n")]
