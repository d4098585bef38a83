"""Every analyst notebook runs, top to bottom, against a database that replay wrote."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from engine.apps.replay import replay
from engine.simulator.scenario import generate, load_scenario, write_files
from tests.conftest import make_settings

NOTEBOOKS = sorted(Path("notebooks").glob("*.ipynb"))
# The pictures each notebook draws.
FIGURES = {
    "alerts-first-look.ipynb": (
        "traffic per menu",
        "answer rate and talk time",
        "alerts per rule with verdicts",
        "rule window against its threshold",
    )
}


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("notebooks")
    generated = generate(load_scenario(Path("data/scenarios/fraud-mix.yaml")))
    events_path, _ = write_files(generated, work / "scenario")
    settings = make_settings(work / "data", detection={"alerts_jsonl": "off"})
    replay([events_path], settings)
    return work / "data" / "callsentry.duckdb"


@pytest.mark.slow
# The notebook machinery (jupyter_client, zmq) warns about its own coming changes;
# whatever goes wrong in the notebook itself still fails as a CellExecutionError.
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_against_a_replayed_database(
    path: Path, database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("CALLSENTRY_DB", str(database))
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": "."}}
    )
    client.execute(env={**os.environ})
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "model alerts" in printed
    # Each picture was drawn, from rows (the notebook refuses to draw nothing), and is
    # in the notebook as an image.
    for figure in FIGURES.get(path.name, ()):
        assert f"figure {figure}: drawn from" in printed, f"{figure} was not drawn"
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= len(FIGURES.get(path.name, ()))


def test_there_is_a_notebook() -> None:
    assert NOTEBOOKS, "notebooks/ ships at least one analyst notebook"
