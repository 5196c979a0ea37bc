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
    assert "{'hi': 'Ada'}" in proc.stdout
    assert "success" in proc.stdout
