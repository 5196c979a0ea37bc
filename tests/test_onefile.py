"""The one-file build: ``scripts/build_onefile.py`` makes a zipapp that serves on a machine without minifaas.

Slow (about a minute to build, ~10 s to unpack and start): run with ``pytest -m slow tests/test_onefile.py``.
The smoke test runs the file with a fresh venv's interpreter in an empty folder, so the checkout and the
site-packages of this machine cannot stand in for what the file bundles.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_onefile.py"
#: the file bundles numpy, OpenCV and LiteRT; over this something unexpected got in
MAX_BYTES = 400 << 20

pytestmark = pytest.mark.slow


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_onefile", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("shiv", reason="pip install shiv (CI installs it)")
    out = tmp_path_factory.mktemp("onefile") / "minifaas.pyz"
    figures = _script().build(out, quiet=True)
    print(f"\nbuilt {out}: {figures['bytes'] / 1e6:.1f} MB in {figures['build_s']} s")
    return out


def test_pyz_is_one_executable_zip(pyz: Path) -> None:
    assert pyz.stat().st_size < MAX_BYTES
    assert pyz.stat().st_mode & 0o111, "not executable"
    assert pyz.read_bytes()[:40].startswith(b"#!/usr/bin/env python3.11\n")
    with zipfile.ZipFile(pyz) as zf:
        names = set(zf.namelist())
    assert "site-packages/minifaas/_server/ui/app.js" in names
    assert "site-packages/minifaas_sandbox/runtime.py" in names
    assert not any("/tests/" in n and n.startswith("site-packages/minifaas/") for n in names)


def test_pyz_serves_deploys_and_invokes(pyz: Path) -> None:
    timings = _script().smoke(pyz)
    print(f"\nsmoke: {timings}")
    assert timings["warm_invoke_s"] < timings["cold_invoke_s"]


def test_build_script_help() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--smoke" in out.stdout
