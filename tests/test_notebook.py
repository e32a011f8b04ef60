"""examples/analysis.ipynb is committed executed, and executing it again on the committed runs
gives the same outputs (so it never rots: after a change, rerun examples/make_notebook.py)."""
import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def text_outputs(notebook) -> list[str]:
    """The printed and plain-text outputs of every code cell, in order."""
    return ["".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)
            for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
def test_analysis_notebook_is_committed_executed_and_current():
    committed = nbformat.read(ROOT / "examples" / "analysis.ipynb", as_version=4)
    assert all(text_outputs(committed)), "a code cell has no output: run python examples/make_notebook.py"
    images = [o for cell in committed.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the kNN fall, Figure 4 and the attention logits, drawn
    notebook = copy.deepcopy(committed)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert text_outputs(notebook) == text_outputs(committed), "stale: run python examples/make_notebook.py"
    text = "".join(text_outputs(notebook))
    assert "patch_embed had 33 spike events" in text  # the lead-lag summary of the real storm
    assert "no evidence that patch_embed spikes lead" in text
