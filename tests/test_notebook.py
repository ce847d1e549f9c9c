"""The exploration notebook runs top to bottom, offline, from its own folder (as Jupyter runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


@pytest.mark.slow
def test_notebook_executes(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "saved with outputs"
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    nbformat.write(notebook, tmp_path / "executed.ipynb")
    text = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "unpatched 4.61 GFLOPs -> patched 3.01 GFLOPs" in text
    assert "patched: False | GFLOPs: 4.61" in text
    images = sum(
        1
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    )
    assert images >= 4  # three photographs and the sweep (plus digits when ../shared is there)
