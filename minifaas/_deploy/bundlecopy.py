"""Copying a function's folder (and the files its manifest includes) into a staging folder, safely.

A folder is copied as it is: a symbolic link stays a link (rewritten relative, so it points into the copy) when
it resolves inside the folder, and is refused when it resolves outside (a link to a secret file was copied in)
or nowhere; ``loop -> .`` is one link, not 40 nested copies. Bytes and entries are capped as for zips, and
checked while copying, so a huge tree is refused before it fills the disk.

``include`` entries of ``minifaas.json`` are relative paths confined to the project root (the nearest folder
above the function holding a ``pyproject.toml``, ``setup.py``, ``setup.cfg`` or ``.git``; else the function
folder's parent), and land under their base name, which must not name a file the bundle already has.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Final

from .._errors import DeployError

__all__ = ("CopyBudget", "copy_folder", "include_into", "project_root")

#: what a folder bundle may hold (the zip limits: 48 MiB unpacked, 10,000 entries)
MAX_BUNDLE_BYTES: Final = 48 << 20
MAX_BUNDLE_ENTRIES: Final = 10_000
IGNORED_NAMES: Final = frozenset({"__pycache__", ".git"})
IGNORED_SUFFIXES: Final = (".pyc",)
PROJECT_MARKERS: Final = ("pyproject.toml", "setup.py", "setup.cfg", ".git")


class CopyBudget:
    """Bytes and entries left for one bundle; raises :class:`DeployError` naming the bundle when exceeded."""

    def __init__(self, origin: str, max_bytes: int | None = None, max_entries: int | None = None) -> None:
        self.origin = origin
        self.max_bytes = MAX_BUNDLE_BYTES if max_bytes is None else max_bytes
        self.max_entries = MAX_BUNDLE_ENTRIES if max_entries is None else max_entries
        self.bytes = 0
        self.entries = 0

    def take(self, size: int) -> None:
        self.entries += 1
        self.bytes += size
        if self.entries > self.max_entries:
            raise DeployError(f"folder has over {self.max_entries} entries", file=self.origin)
        if self.bytes > self.max_bytes:
            raise DeployError(f"folder holds over {self.max_bytes} bytes", file=self.origin)


def _ignored(name: str) -> bool:
    return name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


def copy_folder(src: Path, dest: Path, budget: CopyBudget) -> None:
    """Copy ``src`` into ``dest`` (which may exist): links as links confined to ``src``, within ``budget``."""
    src = src.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for name in [*dirnames, *sorted(f for f in filenames if not _ignored(f))]:
            path = here / name
            target = dest / rel_dir / name
            try:
                st = path.lstat()
            except OSError as exc:
                raise DeployError(f"cannot read {rel_dir / name}: {exc.strerror or exc}", file=budget.origin) from None
            budget.take(st.st_size if stat.S_ISREG(st.st_mode) else 0)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(_confined_link(path, src, budget.origin), target)
            elif stat.S_ISDIR(st.st_mode):
                target.mkdir(exist_ok=True)
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(path, target, follow_symlinks=False)
            else:
                raise DeployError(f"{rel_dir / name} is not a regular file, folder or link", file=budget.origin)


def _confined_link(link: Path, root: Path, origin: str) -> str:
    """The link's target, relative to the link's folder, when it resolves inside ``root``."""
    name = link.relative_to(root)
    try:
        resolved = link.resolve(strict=True)
    except (OSError, RuntimeError):
        raise DeployError(f"symbolic link {name} is broken or loops", file=origin) from None
    if not resolved.is_relative_to(root):
        raise DeployError(f"symbolic link {name} points outside the folder ({os.readlink(link)})", file=origin)
    return os.path.relpath(resolved, link.parent)


def project_root(folder: Path) -> Path:
    """The folder ``include`` entries must stay in (see the module's docstring)."""
    folder = folder.resolve()
    for parent in folder.parents:
        if any((parent / marker).exists() for marker in PROJECT_MARKERS):
            return parent
    return folder.parent


def include_into(folder: Path, entries: list[object], staging: Path, budget: CopyBudget, manifest: str) -> None:
    """Copy each ``include`` entry (relative to ``folder``) to ``staging/<base name>``."""
    root = project_root(folder)
    for inc in entries:
        if not isinstance(inc, str) or not inc or "\0" in inc:
            raise DeployError(f"include entries must be non-empty relative paths, not {inc!r}", file=manifest)
        if PurePosixPath(inc).is_absolute() or Path(inc).is_absolute():
            raise DeployError(f"include {inc!r} is absolute: name files relative to the function folder", file=manifest)
        src = (folder / inc).resolve()
        if not src.is_relative_to(root):
            raise DeployError(f"include {inc!r} is outside the project root {root}", file=manifest)
        if not src.exists():
            raise DeployError(f"included file {inc!r} does not exist", file=manifest)
        dest = staging / src.name
        if dest.exists() or dest.is_symlink():
            raise DeployError(f"include {inc!r} would replace the bundle's own {src.name!r}", file=manifest)
        if src.is_dir():
            copy_folder(src, dest, budget)
        else:
            budget.take(src.stat().st_size)
            shutil.copy2(src, dest)
