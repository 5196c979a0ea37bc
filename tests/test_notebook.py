"""Notebooks: examples/catalog.ipynb and the async API, executed by nbclient on a real ipykernel kernel."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "catalog.ipynb"
CELL_TIMEOUT_S = 300


def _execute(nb: Any, cwd: Path) -> Any:
    NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def _outputs(cell: Any) -> list[dict[str, Any]]:
    return list(cell.get("outputs", []))


def _html(cell: Any) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in _outputs(cell))


def _text(cell: Any) -> str:
    return "".join(
        o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", "")
        for o in _outputs(cell)
    )


@pytest.fixture(scope="module")
def example() -> Any:
    return _execute(nbformat.read(EXAMPLE, as_version=4), EXAMPLE.parent)


def _cell(nb: Any, startswith: str) -> Any:
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith))


def test_no_cell_failed(example: Any) -> None:
    errors = [o for c in example.cells for o in _outputs(c) if o.get("output_type") == "error"]
    assert not errors, errors


def test_the_crop_runs_in_process_and_shows_its_image(example: Any) -> None:
    cell = _cell(example, "from IPython.display import Image")
    assert "'person': True" in _text(cell)
    assert any("image/png" in o.get("data", {}) for o in _outputs(cell))


def test_a_notebook_function_deploys_and_renders(example: Any) -> None:
    deployed = _cell(example, "SHARP_AT")
    assert "minifaas function quick_gate@1" in _html(deployed)
    act = _cell(example, "act = gate.call")
    html = _html(act)
    assert "quick_gate@1" in html and ">success<" in html and "cold start" in html
    assert re.search(r"&quot;sharpness&quot;: [0-9.]+", html)


def test_the_catalog_maps_over_the_photos_with_progress(example: Any) -> None:
    cell = _cell(example, "import sys")
    progress = _html(cell)
    photos = sorted(p.name for p in (ROOT / "tests" / "data" / "images").iterdir() if p.suffix in (".jpg", ".png"))
    assert f"<progress value='{len(photos)}' max='{len(photos)}'>" in progress and "0 failed" in progress
    outcomes = _text(cell)
    for name in photos:
        assert repr(name) in outcomes
    assert "'messi5.jpg': 'catalog'" in outcomes and "'text_motion.jpg': 'rejected'" in outcomes


def test_a_session_renders_as_its_flow_graph(example: Any) -> None:
    html = _html(_cell(example, "session_id = engine.submit"))
    assert "<svg" in html and "minifaas-graph" in html
    assert 'class="node success"' in html and 'class="edge taken"' in html
    assert 'class="node untaken"' in html  # the branch the photo did not take, greyed


def test_async_api_with_top_level_await(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import minifaas\n\n"
            "def inc(args):\n"
            "    return {'n': args['n'] + 1}\n\n"
            "async with minifaas.Engine() as engine:\n"
            "    fn = await engine.deploy(inc)\n"
            "    out = [r['n'] async for r in fn.map({'n': i} for i in range(5))]\n"
            "    act = await fn.call({'n': 41})\n"
            "out, act.result"
        ),
        nbformat.v4.new_code_cell(
            "with minifaas.SyncEngine() as sync:  # the blocking twin inside the kernel's running loop\n"
            "    print(sync.deploy(inc).invoke({'n': 1}))"
        ),
    ]
    _execute(nb, tmp_path)
    assert "([1, 2, 3, 4, 5], {'n': 42})" in _text(nb.cells[0])
    assert "{'n': 2}" in _text(nb.cells[1])
