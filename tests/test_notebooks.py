"""Executes every notebook in notebooks/ end to end (small settings) with nbclient.

A failing cell fails the test with the notebook's name, the cell's index and its first
line. Notebooks are committed without outputs and start with the Colab install cell.
"""

import glob
import os

import nbclient
import nbformat
import pytest

from conftest import link_smollm2
from conftest import XLA_CACHE_OPTIONS

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")

# Notebook -> (environment giving small settings, strings its outputs must contain).
NOTEBOOKS = {
    "quickstart.ipynb": ({"QUICKSTART_STEPS": "6"}, ["NFE", "step 1:"]),
    # A workdir without a checkpoint and no adaptation: SmolLM2 with zero adapters (ISD
    # stays lossless).
    "decoding.ipynb": ({"DECODING_ADAPT_STEPS": "0", "DECODING_MAX_NEW": "12",
                        "DECODING_WORKDIR": "{tmp}",
                        # SmolLM2's forwards: faster at XLA's default LLVM level than
                        # at the -O0 the rest of the suite compiles with (conftest).
                        "XLA_FLAGS": ""}, [
        "ISD identical to AR: True", "same text as AR: True", "forwards for"]),
    # FLOPs up to 2k (two lengths to fit), a 320-token pass key with chunks of 32 (two
    # thirds compressed); rank 4 leaves three caches to compare (ranks 4 and 8, no sink).
    "long_context.ipynb": ({"LONG_CONTEXT_MAX_N": "2048", "LONG_CONTEXT_PASSKEY_LENGTH": "320",
                            "LONG_CONTEXT_CHUNK": "32", "LONG_CONTEXT_RANK": "4",
                            "LONG_CONTEXT_WORKDIR": "{tmp}"}, [
        "fitted exponent of n", "of full", "full-cache answer equals the pass key: True",
        "compressed"]),
    "checkpoints.ipynb": ({"CHECKPOINTS_STEPS": "3"}, [
        "8 devices", "P('tensor', 'fsdp')", "hold the same values",
        "exported and reloaded parameters are identical"]),
}


class NotebookCellError(AssertionError):
  """A cell of a notebook raised."""


def execute(path: str) -> nbformat.NotebookNode:
  """Runs ``path`` in a fresh python3 kernel (cwd: its folder); returns it with outputs.

  Raises:
    NotebookCellError: naming the notebook, the failing cell and the error.
  """
  nb = nbformat.read(path, as_version=4)
  # The per-cell limit only stops a hung kernel; cells here take seconds.
  client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(path)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    for index, cell in enumerate(nb.cells):
      errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
      if errors:
        first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        raise NotebookCellError(
            f"{os.path.basename(path)}: cell {index} ({first_line!r}) raised "
            f"{errors[0]['ename']}: {errors[0]['evalue']}") from e
    raise NotebookCellError(f"{os.path.basename(path)}: {e}") from e
  return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))


# Notebooks that make their workdir with tempfile.mkdtemp(prefix=...).
TEMP_WORKDIRS = {"checkpoints.ipynb": "checkpoints_", "quickstart.ipynb": "quickstart_"}

# Notebooks whose workdir ("{tmp}") gets the session's converted SmolLM2 (conftest).
USE_SMOLLM2 = ("decoding.ipynb", "long_context.ipynb")


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, monkeypatch, tmp_path, request):
  env, expected = NOTEBOOKS[name]
  if name in USE_SMOLLM2:
    link_smollm2(request.getfixturevalue("smollm2_cache"), tmp_path)
  for key, value in env.items():
    # The kernel inherits the environment; "{tmp}" is this test's folder.
    monkeypatch.setenv(key, value.format(tmp=tmp_path))
  # What a notebook puts in tempfile's folder (its workdir) goes with this test's folder.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  # The kernel's own persistent compilation cache (as conftest gives this process).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))
  for key, value in XLA_CACHE_OPTIONS.items():
    monkeypatch.setenv(key.upper(), str(value))
  text = outputs_text(execute(os.path.join(NOTEBOOK_DIR, name)))
  missing = [s for s in expected if s not in text]
  assert not missing, f"{name}: outputs lack {missing}"
  # Its tempfile workdir landed here (removed with tmp_path), not in the system's /tmp.
  prefix = TEMP_WORKDIRS.get(name)
  assert prefix is None or [p for p in os.listdir(tmp_path) if p.startswith(prefix)], name


def test_every_notebook_is_tested_and_committed_clean():
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
  assert found == sorted(NOTEBOOKS), f"notebooks without a test entry: {set(found) - set(NOTEBOOKS)}"
  for name in found:
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    with_outputs = [i for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"{name}: cells {with_outputs} were committed with outputs"
    first = code[0].source
    assert 'find_spec("blockdiff_jax")' in first and "%pip install" in first, (
        f"{name}: the first code cell must install the package when it is missing (Colab)")
    if name != "quickstart.ipynb":
      quickstart = nbformat.read(os.path.join(NOTEBOOK_DIR, "quickstart.ipynb"), as_version=4)
      links = "".join(c.source for c in quickstart.cells if c.cell_type == "markdown")
      assert f"({name})" in links, f"quickstart.ipynb does not link to {name}"


def test_failing_cell_names_notebook_and_cell(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_markdown_cell("# broken"),
      nbformat.v4.new_code_cell("x = 1"),
      nbformat.v4.new_code_cell("y = x + 1\nraise ValueError(f'boom {y}')"),
      nbformat.v4.new_code_cell("open('never_reached', 'w').close()"),
  ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                              "language": "python"}})
  path = os.path.join(tmp_path, "broken.ipynb")
  nbformat.write(nb, path)
  with pytest.raises(NotebookCellError,
                     match=r"broken\.ipynb: cell 2 \('y = x \+ 1'\) raised ValueError: boom 2"):
    execute(path)
  assert not os.path.exists(os.path.join(tmp_path, "never_reached"))
