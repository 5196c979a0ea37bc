"""The README's examples run as written (the plugin's fixtures, in-process testing, a workflow)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]


def test_readme_has_the_two_fresh_machine_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "pip install -e . && minifaas demo" in text
    test_cmd = "pip install -e '.[dev,ray]' && python -m pytest"
    assert test_cmd in text
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_pytest_examples(pytester: pytest.Pytester) -> None:
    blocks = [b for b in _python_blocks() if "def test_" in b]
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        pytester.makepyfile(**{f"test_example_{i}": block})
    (pytester.path / "functions").symlink_to(ROOT / "functions")
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=4)


def test_readme_embedding_example(tmp_path: Path) -> None:
    import subprocess
    import sys

    block = next(b for b in _python_blocks() if "anyio.run(main)" in b)
    script = tmp_path / "embed.py"
    script.write_text(block)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[200 200 200]", "100 results, in order"]


def test_ci_runs_the_test_command_in_a_fresh_venv() -> None:
    # CI runs the way a newcomer does: a new virtualenv, activated, then README's test command word for word,
    # so nothing installed by hand into the machine's interpreter can hide a missing step
    import subprocess

    script = ROOT / ".ci" / "run"
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = [line.strip() for line in script.read_text().splitlines() if not line.strip().startswith("#")]
    venv = next(i for i, line in enumerate(lines) if " -m venv " in line)
    activate = next(i for i, line in enumerate(lines) if line.startswith("source ") and "/bin/activate" in line)
    test = lines.index("pip install -e '.[dev,ray]' && python -m pytest")
    assert venv < activate < test
    assert not any("--system-site-packages" in line for line in lines)
    # what pip cannot install, CI does: Chromium for the browser tests, npm for the JS client's test
    text = script.read_text()
    assert "apt_install chromium" in text and "apt_install npm" in text and "npm ci" in text
