"""Executes notebooks/quickstart.ipynb end to end (short training) with nbclient."""

import os

import nbclient
import nbformat

_NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv("QUICKSTART_STEPS", "6")
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=90, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(_NOTEBOOK)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "NFE" in outputs and "step 1:" in outputs
