"""The notebooks in notebooks/ run top to bottom, on CPU, with their SMALL parameters (the shipped toy model, tiny
sizes; no download): any cell error fails the test, naming the cell.

Each runs in a fresh Jupyter kernel of this Python (nbclient) in a temporary folder, with 4 host CPU devices so that
the mesh cells split their batch; the notebooks' first cell skips the pip install because sdjax is importable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_PER_CELL = 600
KERNEL = "sdjax-tests"


def test_the_notebooks_are_committed_without_outputs():
    assert {"quickstart.ipynb", "trajectories.ipynb", "train_toy.ipynb"} <= {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert "install" in nb.cells[1].source and "find_spec(\"sdjax\")" in nb.cells[1].source, path.name
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} holds outputs"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A Jupyter path holding one kernel, this Python (whichever `python3` kernels the machine has installed)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sdjax tests", "language": "python"}))
    return root


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One JAX compilation cache for the notebooks' kernels and the commands they run: a program compiled once
    (the toy pipeline at batch 2) is not compiled again by the next notebook or by `sdjax trajectories`."""
    return tmp_path_factory.mktemp("jax-cache")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, kernel_dir, compile_cache):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("SDJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the SMALL settings never touch the hub
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_PER_CELL, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}) or "image/gif" in o.get("data", {}))
    assert images >= 2, f"{path.name} showed {images} pictures inline"
