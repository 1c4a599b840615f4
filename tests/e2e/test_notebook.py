"""The learners' walkthrough runs top to bottom, in its short mode, as a learner's Jupyter would run it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
DATA_DIR = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "tinyshakespeare" / "input.txt").is_file(), reason="needs ../shared/data")
def test_the_walkthrough_runs_every_cell_without_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    # A data folder of our own that links to the corpus: the token caches it builds stay out of ../shared.
    corpus = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    corpus.parent.mkdir(parents=True)
    corpus.symlink_to(DATA_DIR / "tinyshakespeare" / "input.txt")
    monkeypatch.setenv("GPT_LIGHTNING_SMOKE", "1")
    monkeypatch.setenv("GPT_LIGHTNING_DATA_DIR", str(corpus.parents[1]))
    monkeypatch.setenv("GPT_LIGHTNING_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Run from the notebooks/ folder, as Jupyter does; a cell that raises fails the test (CellExecutionError).
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the loss curves and the attention maps
    assert not [o for o in outputs if o.output_type == "error"]
    assert list((tmp_path / "data" / "token_cache").iterdir())  # its caches went where its data is


def test_the_committed_walkthrough_has_its_outputs_and_stays_small():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs for cell in code), "commit the notebook executed, with its outputs"
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2 and NOTEBOOK.stat().st_size < 1_000_000
    text = "".join(o.get("text", "") for cell in code for o in cell.outputs)
    assert "smoke mode: False" in text, "commit the outputs of a full run, not of the smoke mode"
