"""The tutorial notebooks run top to bottom (so they cannot rot); each writes into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    assert NOTEBOOKS, "no notebooks found"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors
    assert (tmp_path / "notebook-runs").is_dir()
    # the inline backend renders headless: every notebook shows at least one figure
    assert any(
        "image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", [])
    )
