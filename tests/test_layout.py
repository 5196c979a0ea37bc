"""The package's folders show its architecture: each private subpackage imports only the rooms its ``__init__`` allows.

The rules live here and in each subpackage's docstring; the import graph is read from the source with ``ast``, lazy
imports and ``TYPE_CHECKING`` blocks included, so a rule cannot be dodged by moving an import into a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minifaas"

#: room -> the rooms it may import (besides itself, the standard library and third-party packages)
ALLOWED: dict[str, set[str]] = {
    "_errors": {"_core"},
    "_environ": set(),  # only for the Activation type an ActivationError carries (TYPE_CHECKING)
    "_deploy": {"_errors", "_environ"},
    "_core": {"_errors", "_deploy", "_environ"},
    "composer": {"_errors"},
    "_workflows": {"_errors", "_core", "composer"},
    "_events": {"_errors", "_core"},
    "_backends": {"_errors", "_core", "_deploy", "_environ"},
    "_map": {"_errors", "_core", "_engine"},  # _engine for its type only (TYPE_CHECKING)
    "_handles": {"_errors", "_core", "_map", "_engine"},  # likewise
    "_engine": {"_errors", "_core", "_deploy", "_workflows", "_events", "composer", "_handles", "_map"},
    "_sync": {"_errors", "_core", "_deploy", "_workflows", "_events", "composer", "_engine", "_handles"},
    "_server": {"_errors", "_core", "_deploy", "_workflows", "_events", "composer", "_engine"},
    "_cli": {"_errors", "_core", "_deploy", "_workflows", "_events", "composer", "_engine", "_server"},
    "testing": {"_errors", "_core", "_deploy", "_events", "_fakeclock", "_inprocess", "_testkit"},
    "_fakeclock": set(),
    "_inprocess": {"_errors", "_core", "_deploy"},
    "_testkit": {"_errors", "_core", "_deploy", "_sync"},
    "pytest_plugin": {"_errors", "_engine", "testing", "_pytest_backend"},
    "_pytest_backend": set(),
}
#: the one place a lower room reaches a backend: the engine picks it by name and imports it lazily
LAZY_EXCEPTIONS = {("_engine", "_backends")}


def _room(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "minifaas", module
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported minifaas module, line, inside a function) for every import in the file (or ``source`` read as it)."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                if target.startswith("minifaas") and not target.startswith("minifaas_sandbox"):
                    if target == "minifaas":  # from minifaas import x / from . import x: x may be a module
                        found.extend((f"minifaas.{a.name}", child.lineno, nested) for a in child.names)
                    else:
                        found.append((target, child.lineno, nested))
            elif isinstance(child, ast.Import):
                found.extend(
                    (a.name, child.lineno, nested)
                    for a in child.names
                    if a.name.startswith("minifaas") and not a.name.startswith("minifaas_sandbox")
                )
            visit(child, nested)

    visit(tree, False)
    return found


def _files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_belongs_to_a_room() -> None:
    rooms = {_room(_module_name(p)) for p in _files()}
    assert rooms <= set(ALLOWED), f"rooms without rules: {sorted(rooms - set(ALLOWED))}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_rooms_import_only_what_they_may(path: Path) -> None:
    room = _room(_module_name(path))
    bad = []
    for target, line, in_function in _imports(path):
        other = _room(target)
        if other not in ALLOWED:
            other = "__init__"  # a name the package root defines (``from .. import __version__``)
        if other in (room, "__init__") and other != "__init__":
            continue
        if other == "__init__":
            if room != "_cli":  # the command line is the package's outermost client (it prints __version__)
                bad.append(f"line {line}: imports the package root (minifaas) from inside it")
        elif other not in ALLOWED[room] and not ((room, other) in LAZY_EXCEPTIONS and in_function):
            bad.append(f"line {line}: {room} imports {target}")
    assert not bad, f"{path.relative_to(PACKAGE)} breaks the layering rules:\n" + "\n".join(bad)


def test_the_rules_see_a_violation() -> None:
    """The check itself works: a core module importing the server is caught, even from inside a function."""
    path = PACKAGE / "_core" / "scheduler.py"
    source = path.read_text() + "\n\ndef _sneaky() -> None:\n    from .._server import app\n"
    assert ("minifaas._server", True) in {(t, nested) for t, _, nested in _imports(path, source)}
    assert ("minifaas._server", True) not in {(t, nested) for t, _, nested in _imports(path)}


def test_no_harness_in_the_product() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not names & {"_crashhost", "_proc", "crashhost", "proc"}, "test harnesses live in tests/helpers"
