"""Run notebooks/explore.ipynb end to end (embedded model) and check its key outputs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def _text_outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_saved_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs before saving"


@pytest.mark.embedded
def test_explore_notebook_runs(tmp_path, monkeypatch, embedded_model):
    """The whole notebook, timed with its quick tuned lens trained anew: a cache of its own, with
    the embedded model's converted files (built by the `embedded_model` fixture) linked in."""
    import nbformat
    from nbclient import NotebookClient

    from idiom_lens.models.loading import cache_dir

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))  # the kernel inherits it

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A first cell that reports the kernel's interpreter: it must be this test's (the venv's) Python.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # jupyter_client maps the "python3" kernel's `python` to sys.executable; the PATH makes sure anyway.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    started = time.perf_counter()
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - started

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert _text_outputs(nb.cells[0]).strip() == sys.executable
    texts = [_text_outputs(c) for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(texts)
    assert "'once in a blue' -> ' moon'" in everything  # the prediction cell
    assert "top neurons (layer, neuron)" in everything  # the attribution cell
    assert "configurations change the prediction" in everything  # the knockout cell
    assert "after zeroing the top-10 neurons" in everything  # the hand-made hook
    assert "memorized" in everything and "idiom" in everything  # the 30-idiom summary
    assert "stages: ['trajectory', 'recall', 'interventions']" in everything  # run_study, read back through StudyFolder
    assert "noised:" in everything and "when the last token cannot read the earlier words" in everything  # section 7
    assert "lens read-outs agree at the last layer: True" in everything  # section 8
    assert "implanted into layer 8: 1.00 predicted" in everything  # section 9: the implant took
    assert "median drop in log p per knocked-out layer" in everything  # and the knockout read it
    from idiom_lens.models.precision import matmul_precision

    choice = matmul_precision("cpu", log=lambda line: None)  # the kernel decided the same way on this machine
    assert f"tuned lens products in {choice.name} ({choice.reason.split(' measured')[0]}" in everything
    assert not list((tmp_path / "cache" / "lenses").rglob("*.work"))  # trained to the end, here
    figures = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 5, f"expected the notebook's figures, got {len(figures)}"
    print(f"the notebook ran in {seconds:.0f} s")  # its time is measured, not asserted (README: the notebook)
