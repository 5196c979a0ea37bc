"""Host side of ``isolation="sandbox"``: checking the machine can do it, and what a sandbox's view shows and hides.

The sandbox sets itself up (``minifaas_sandbox.isolation``); the host decides what it may see: its own bundle,
environment and the model store read-only, the folders granted at deploy, and none of the engine's state.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from .._errors import DeployError

__all__ = ("ISOLATION_MODES", "Isolation", "check_grants", "check_isolation", "interpreter_paths", "require_sandbox")

Isolation = Literal["process", "sandbox"]
ISOLATION_MODES: Final[tuple[str, ...]] = ("process", "sandbox")
#: the probe forks a child that sets a sandbox up; a cold interpreter start is most of it
PROBE_TIMEOUT_S: Final = 30.0


def check_isolation(value: Any) -> Isolation:
    if value not in ISOLATION_MODES:
        raise DeployError(f"invalid isolation {value!r}: use 'process' or 'sandbox'")
    return "sandbox" if value == "sandbox" else "process"


@functools.cache
def _probe() -> str | None:
    """What stops a sandbox from being set up on this machine (None: nothing); asked once per host process."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "minifaas_sandbox.isolation", "--probe"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the isolation probe did not run: {exc}"
    if done.returncode == 0:
        return None
    return (done.stdout.strip() or done.stderr.strip()[-2000:]) or f"the probe exited with {done.returncode}"


def require_sandbox() -> None:
    """Raise DeployError naming what is missing when this machine cannot set up ``isolation="sandbox"``."""
    missing = _probe()
    if missing is not None:
        raise DeployError(
            "isolation='sandbox' is not available here (it needs user, mount and IPC namespaces, "
            f"mount_setattr and libseccomp): {missing}; deploy with isolation='process' to run unconfined"
        )


def check_grants(name: str, paths: Iterable[Any]) -> tuple[str, ...]:
    """Absolute, existing folders or files other than ``/``; DeployError naming the bad one otherwise."""
    if isinstance(paths, str | os.PathLike):
        raise DeployError(f"{name} must be a list of paths, not one path")
    out: list[str] = []
    for raw in paths:
        if not isinstance(raw, str | os.PathLike):
            raise DeployError(f"{name} entries must be paths, not {type(raw).__name__}")
        path = os.path.abspath(os.fspath(raw))
        if path == "/":
            raise DeployError(f"{name} cannot grant the whole filesystem ('/')")
        if not os.path.exists(path):
            raise DeployError(f"{name}: {path} does not exist")
        out.append(path)
    return tuple(out)


def interpreter_paths() -> tuple[str, ...]:
    """The interpreter's folders: every sandbox sees them read-only (it runs this interpreter), so a function may
    have the host read a file there for it too (e.g. OpenCV's bundled cascades)."""
    found = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    found |= {os.path.realpath(p) for p in sys.path if p and os.path.isabs(p) and p.endswith("-packages")}
    return tuple(sorted(found))


def own_paths(source: dict[str, Any], sys_path: Sequence[str], model_root: Path | None) -> tuple[str, ...]:
    """What a function's sandbox reads besides the grants: its bundle folder, environment and the model store."""
    out: list[str] = []
    if source.get("kind") == "dir" and source.get("path"):
        out.append(os.path.dirname(str(source["path"])))
    out += [str(p) for p in sys_path if os.path.isdir(p)]
    if model_root is not None and model_root.is_dir():
        out.append(str(model_root))
    return tuple(out)
