"""A state dir belongs to one namespace and to its owner only.

Saved actions carry parameters (often API keys), triggers carry tokens, activation records carry results: none of
them says which namespace it belongs to. So the namespace is recorded once, in ``state_dir/namespace``, and an
engine started on that dir under another namespace is refused instead of showing the first one's entities. The
dir is kept 0700 and the files minifaas writes there 0600.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from .._errors import StateDirConflict

__all__ = ("claim_state_dir", "make_private", "write_private")

NAMESPACE_FILE_NAME: Final = "namespace"
PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600
#: the activation store's file: a state dir from before the namespace marker has it
STORE_FILE_NAME: Final = "activations.sqlite3"
#: files an engine opens at the top of its state dir (SQLite makes its -wal/-shm files with the db's mode)
DB_GLOB: Final = "*.sqlite3*"


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically as a 0600 file (through a temporary file beside it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # an older tmp file may exist with a wider mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def claim_state_dir(state_dir: Path, namespace: str) -> None:
    """Create ``state_dir`` (0700) for ``namespace``, or check that it was created for it."""
    marker = state_dir / NAMESPACE_FILE_NAME
    state_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    # a folder the user named that holds other things keeps its mode; ours (new, empty or marked) is private
    if marker.exists() or (state_dir / STORE_FILE_NAME).exists() or not any(state_dir.iterdir()):
        os.chmod(state_dir, PRIVATE_DIR_MODE)
    try:
        owner = marker.read_text("utf-8").strip()
    except FileNotFoundError:
        # a state dir from before the marker existed is taken to be the current namespace's
        write_private(marker, f"{namespace}\n".encode())
        return
    if owner != namespace:
        raise StateDirConflict(
            f"the state dir {state_dir} belongs to namespace {owner!r}, not {namespace!r}: "
            f"start with namespace {owner!r} or use another state dir"
        )


def make_private(state_dir: Path) -> None:
    """Make the database files at the top of ``state_dir`` 0600 (SQLite creates them with the umask's mode)."""
    for path in state_dir.glob(DB_GLOB):
        if path.is_file():
            os.chmod(path, PRIVATE_FILE_MODE)
