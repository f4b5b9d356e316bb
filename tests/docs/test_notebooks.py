"""The tutorial notebooks: executed from scratch by the tests, committed with their outputs.

The tests clear every output and run each notebook top to bottom in a temp folder, so they
cannot rot; the committed copies carry their outputs (small PNG figures) so a reader browsing
the repository sees them without running anything. `make notebooks` refreshes those copies:

    python tests/docs/test_notebooks.py   # executes notebooks/*.ipynb in place
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the kit, also when run as a script
from helpers import REPO, repo_env  # noqa: E402

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
MAX_PNG_BYTES = 200_000  # per notebook: figures are for reading, not archiving


def execute(path: Path, cwd: Path):
    """`path` executed from scratch with `cwd` as its working folder; returns the notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel imports bonnerlab from this checkout, whatever the venv's editable install says.
    env = repo_env()
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)  # passed on to the kernel manager's start_kernel
    for cell in nb.cells:  # timings and kernel ids only churn the diffs
        cell.metadata.pop("execution", None)
    return nb


def outputs(nb) -> list[dict]:
    return [o for cell in nb.cells for o in cell.get("outputs", [])]


def png_bytes(nb) -> int:
    return sum(
        len(base64.b64decode(o["data"]["image/png"]))
        for o in outputs(nb)
        if "image/png" in o.get("data", {})
    )


def test_notebooks_are_found():
    # outside the parametrized tests: with an empty list those would silently not run at all
    assert [p.name for p in NOTEBOOKS] == [
        "01_extract_layer_and_channel.ipynb",
        "02_analyze_activations.ipynb",
        "03_compare_models_and_encode.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path):
    nb = execute(path, tmp_path)
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert (tmp_path / "notebook-runs").is_dir()
    # the inline backend renders headless: every notebook shows at least one figure
    assert png_bytes(nb) > 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_carries_its_outputs(path: Path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: run `make notebooks` (top to bottom)"
    )
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert 0 < png_bytes(nb) <= MAX_PNG_BYTES, f"{path.name}: {png_bytes(nb)} bytes of PNG"


def main() -> None:
    import nbformat

    for path in NOTEBOOKS:
        # notebooks/notebook-runs/ (git-ignored) holds what the notebooks write
        nb = execute(path, path.parent)
        errors = [o for o in outputs(nb) if o.get("output_type") == "error"]
        if errors:
            sys.exit(f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
        tmp = path.with_suffix(".tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)  # atomic: an interrupted refresh leaves the old notebook
        print(f"{path.relative_to(REPO)}: {len(nb.cells)} cells, {png_bytes(nb) // 1000} kB of PNG")


if __name__ == "__main__":
    main()
