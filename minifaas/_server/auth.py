"""The dev server's ``uuid:key``, kept in its state dir so that clients stay configured across restarts.

OpenWhisk's standalone server has a fixed guest key; ``minifaas serve --state-dir D`` makes one on its first
start and reads it back on every later one. The file is created with mode 0600 (it is a password) and is looser
never: a copy left readable by others is tightened on start.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

from .._errors import CredentialsError

__all__ = ("AUTH_FILE", "stored_auth")

#: under the state dir, next to the server's other records (``server/actions``)
AUTH_FILE: Final = "server/auth"
AUTH_FILE_MODE: Final = 0o600
#: what the file holds: ``user:password`` without blanks, as ``--auth`` takes it
AUTH_RE: Final = re.compile(r"[^\s:]+:\S+")


def stored_auth(state_dir: str | os.PathLike[str], make: str) -> tuple[str, Path]:
    """The ``uuid:key`` kept under ``state_dir`` (written from ``make`` on the first start) and its file."""
    path = Path(state_dir).expanduser() / AUTH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two servers starting at once on one state dir end up with the same key, the first one's
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, AUTH_FILE_MODE)
    except FileExistsError:
        return _read(path), path
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(make + "\n")
    return make, path


def _read(path: Path) -> str:
    try:
        if stat.S_IMODE(path.stat().st_mode) & ~AUTH_FILE_MODE:
            path.chmod(AUTH_FILE_MODE)
        text = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read the server's credentials from {path}: {exc}") from None
    if not AUTH_RE.fullmatch(text):
        raise CredentialsError(
            f"{path} does not hold one uuid:key line; delete it to get a new key, or write the one clients use"
        )
    return text
